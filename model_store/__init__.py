"""Everything a served or trained model is: the frozen backbone, expert bundles (one safetensors file per task
version), the versioned store, the bank snapshot built from it, and classification over a bank.

It imports neither `service` nor `training`. The verbs most callers need:

    backbone = load_backbone("tiny")                 # or "ViT-B-16:openai", "ViT-B-16:file:/weights.safetensors"
    bundle = read_bundle(open("task.bundle", "rb").read())
    store = open_store("./clipbank-store")            # or "s3://bucket/prefix" (the [scale] extra)
    bank = BankLoader(store, backbone).load()
    images = torch.stack([backbone.preprocess(viewed_rgb(im)) for im in pil_images])   # [n, 3, H, W]
    # (model_store.pixels.viewed_rgb: the RGB the server sees; Pillow's own makes dark 16-bit grey white)
    results = classify_batch(bank, [ClassifyItem(images, labels=("cat", "dog"))])
"""

from .lazy import lazy_exports

_EXPORTS = {
    "load_backbone": "backbone",
    "Backbone": "backbone",
    "read_bundle": "bundle",
    "Bundle": "bundle",
    "open_store": "store",
    "LocalStore": "store",
    "S3Store": "store_s3",
    "Store": "store_base",
    "BankLoader": "loader",
    "BankSnapshot": "bank",
    "classify_batch": "inference",
    "ClassifyItem": "inference",
    "ClipbankError": "errors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
