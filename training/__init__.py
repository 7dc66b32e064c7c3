"""Turning labelled images into expert bundles: `train_task` (one task on top of a bank), the `clipbank train`
job, the offline domains and the tiny backbone's pretraining, and the continual-learning and routing
benchmarks' runs. It imports `model_store`, never `service`.

    from model_store.bank import empty_bank
    from model_store.backbone import load_backbone
    from training import TrainConfig, load_image_folder, train_task

    bank = empty_bank(load_backbone("tiny"))  # or BankLoader(open_store(...), backbone).load(): on top of its tasks
    result = train_task(bank, load_image_folder("data/train"), TrainConfig(task="birds"))
    open("birds-v1.safetensors", "wb").write(result.bundle)

Images in memory: `LabelledImages([PIL images], [class index of each], ("sparrow", "wren"))` in place of
`load_image_folder(...)`.
"""

from model_store.lazy import lazy_exports

_EXPORTS = {
    "train_task": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "load_image_folder": "data",
    "LabelledImages": "data",
    "run_train_job": "run",
    "TrainJob": "config",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
