from pipeline.cli import main

if __name__ == "__main__":  # vLLM starts workers with spawn: this guard is required
    raise SystemExit(main())
