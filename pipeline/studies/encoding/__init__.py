"""`python -m pipeline encoding-study`: bytes/token vs the error each cache encoding adds to D_k.

    python -m pipeline encoding-study --out runs/encoding-study            (make encoding-study)

Two teachers, both scored at k = 128 in float32 by the hf engine (smaller k = the first k entries):
- `demo`: the embedded base model (trained, realistic distributions) on the demo training text;
- `random32k`: a random Llama (4 layers, hidden 256, vocab 32000) on random token ids.
A fixed student (the same model with a seeded, perturbed LoRA, so D_k is not ~0) gives logits once.
Every candidate encoding is then written as a real zstd Parquet shard: bytes/token = file size /
tokens; its decoded values give D_k (`cached_kl`, estimator tail) against the float32 cache: the
relative error of the mean D_k (what the training loss sees) and per position (mean and max of
|dD_t| / D_t). Also: a k curve for the default, the target log-prob codecs near p_y = 1, and two short
training runs (float32 cache vs the default encoding, transcoded from the same values).
Writes `study.json` and `study.md` into --out. Times are wall seconds on whatever machine runs it.

One module per job: `settings` (StudyConfig), `candidates` (the encodings compared), `teachers`
(teacher rows, the student, D_k), `measure` (bytes, errors, floors, speed of each encoding),
`training` (the two training runs), `report` (study.md, the plot); `run` runs them in order.
"""
