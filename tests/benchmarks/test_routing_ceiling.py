import numpy as np
import torch

from benchmarks.routing_ceiling import block_features, ceiling, domain_features, feature_sets
from training.data import load_domain


def test_block_features_are_the_frozen_towers_states_and_its_embedding(backbone):
    images = list(load_domain("digits", "test").images)[:5]
    feats = block_features(backbone, images, batch=2)
    blocks = len(backbone.model.visual.transformer.resblocks)
    assert set(feats) == {"emb"} | {f"{s}{b}" for s in ("mean", "std") for b in range(blocks + 1)}
    assert all(v.shape[0] == 5 for v in feats.values())
    x = torch.stack([backbone.preprocess(im) for im in images])
    with torch.no_grad():
        own = backbone.model.encode_image(x, normalize=True).numpy()  # what the selectors are fitted on
    assert np.allclose(feats["emb"], own, atol=1e-5)
    assert not np.allclose(feats["mean0"], feats[f"mean{blocks}"])  # the blocks change the tokens


def test_the_ceiling_tells_apart_domains_that_differ_and_scores_each(backbone):
    names = ["digits", "textures"]
    train = domain_features(backbone, names, "train", 24)
    test = domain_features(backbone, names, "test", 12)
    row = ceiling(train, test, ["emb"], names, "linear")
    assert row["accuracy"] > 0.9 and set(row["per_domain"]) == set(names)
    shuffled = (train[0], np.random.default_rng(0).permutation(train[1]))  # labels carry no information
    assert ceiling(shuffled, test, ["emb"], names, "linear")["accuracy"] < row["accuracy"]
    assert feature_sets(4)[0] == ["emb"] and len(feature_sets(4)) == 8
