"""bench/gpu_throughput.py with the runner encoding all of a step's new images in one vision-tower
pass (``model.embed_multimodal_batch``), without editing engine/model_runner.py: the runner's
``_merge_multimodal`` is replaced, for this process only, by the integration proposed for it.

    PYTHONPATH=. python bench/gpu_throughput_batched_vision.py [gpu_throughput.py flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.model_runner import ForwardBatch, ModelRunner  # noqa: E402


def _merge_multimodal(self: ModelRunner, batch: ForwardBatch):
    """Token embeddings with each covered item's encoder rows written over its placeholders;
    items not cached yet are encoded together, one ``embed_multimodal_batch`` call per modality."""
    embeds = self.model.get_input_embeddings(batch.input_ids)  # [N, hidden]
    fresh: dict = {}
    batched = getattr(self.model, "embed_multimodal_batch", None)
    if batched is not None:
        todo: dict[str, dict] = {}  # modality -> identifier -> feature
        for _, f, _, _, _ in batch.mm_slices:
            if f.identifier not in self.encoder_cache.entries:
                todo.setdefault(f.modality, {}).setdefault(f.identifier, f)
        for modality, feats in todo.items():
            items = list(feats.values())
            encs = batched(modality, [{k: v.to(self.device) for k, v in f.data.items()} for f in items])
            fresh.update((f.identifier, e) for f, e in zip(items, encs))
    for request_id, f, lo, hi, row in batch.mm_slices:
        enc = self.encoder_cache.get(f.identifier, request_id)
        if enc is None:  # first chunk touching this item
            enc = fresh.get(f.identifier)
            if enc is None:
                enc = self.model.embed_multimodal(f.modality, {k: v.to(self.device) for k, v in f.data.items()})
            if enc.shape[0] != f.length:
                raise ValueError(
                    f"multi_modal_data: {f.modality} item yields {enc.shape[0]} embeddings "
                    f"but the prompt has {f.length} placeholder tokens for it"
                )
            self.encoder_cache.put(f.identifier, request_id, enc)
        embeds[row : row + hi - lo] = enc[lo:hi].to(embeds.dtype)
    return embeds


ModelRunner._merge_multimodal = _merge_multimodal

if __name__ == "__main__":
    import gpu_throughput

    raise SystemExit(gpu_throughput.main())
