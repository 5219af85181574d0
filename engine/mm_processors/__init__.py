"""Per-architecture multimodal processors (see engine.mm_processor)."""
