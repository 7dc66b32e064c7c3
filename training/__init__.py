"""Turning labelled images into expert bundles: `train_task` (one task on top of a bank), the `clipbank train`
job, the offline domains and the tiny backbone's pretraining, and the continual-learning and routing
benchmarks' runs. It imports `model_store`, never `service`.

    result = train_task(bank, load_image_folder("data/train"), TrainConfig(task="birds"))
    open("birds.bundle", "wb").write(result.bundle)
"""

from model_store.lazy import lazy_exports

_EXPORTS = {
    "train_task": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "load_image_folder": "data",
    "run_train_job": "run",
    "TrainJob": "config",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
