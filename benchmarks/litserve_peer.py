"""The real-framework peer of `clipbank bench serve`: an open_clip zero-shot server on LitServe.

Written the way LitServe's docs recommend: a `LitAPI` with `setup`, `decode_request`, `predict` (batched: the
server collects up to `max_batch_size` requests, waiting at most `batch_timeout` seconds) and `encode_response`,
and a cache of the text embeddings of each label set, as any careful user would add. It answers the same
multipart request as clipbank's `POST /classify` (`images` files, `labels` fields), so the same load generator
drives both. It exists only to be measured against; it is not part of the service.

    python -m benchmarks.litserve_peer --backbone ViT-B-32:openai --port 8002
"""

# no `from __future__ import annotations`: LitServe reads decode_request's annotation to pass the raw request
import argparse
import io
from collections import OrderedDict

import litserve as ls
import open_clip
import torch
from PIL import Image

from model_store.backbone import parse_backbone_ref

TEXT_CACHE_SIZE = 256  # label sets


class OpenClipZeroShot(ls.LitAPI):
    def __init__(self, backbone: str, max_batch_size: int = 16, batch_timeout: float = 0.005):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/classify")
        self.backbone = backbone

    def setup(self, device):
        ref = parse_backbone_ref(self.backbone)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(ref.model_name, pretrained=ref.weights)
        self.model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(ref.model_name)
        self.texts: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self.device = device

    def decode_request(self, request: ls.Request):
        images = [f.file.read() for f in request.getlist("images")]
        x = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return x, tuple(request.getlist("labels"))

    def _text(self, labels: tuple[str, ...]) -> torch.Tensor:
        if labels in self.texts:
            self.texts.move_to_end(labels)
            return self.texts[labels]
        t = self.model.encode_text(self.tokenizer([f"a photo of a {label}." for label in labels]).to(self.device))
        self.texts[labels] = t / t.norm(dim=-1, keepdim=True)
        if len(self.texts) > TEXT_CACHE_SIZE:
            self.texts.popitem(last=False)
        return self.texts[labels]

    def predict(self, batch):
        if self.max_batch_size == 1:  # LitServe then passes the one request itself
            return self._predict([batch])[0]
        return self._predict(batch)

    def _predict(self, batch):
        sizes = [len(x) for x, _ in batch]
        with torch.inference_mode():
            feats = self.model.encode_image(torch.cat([x for x, _ in batch]).to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            out = []
            for part, (_, labels) in zip(feats.split(sizes), batch, strict=True):
                probs = (100.0 * part @ self._text(labels).T).softmax(dim=-1).cpu()
                out.append((labels, probs))
        return out

    def encode_response(self, output):
        labels, probs = output
        return {"results": [{"labels": [[labels[j], float(p[j])] for j in p.argsort(descending=True)]} for p in probs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--port", type=int, default=8002)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds")
    args = p.parse_args(argv)
    api = OpenClipZeroShot(args.backbone, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="auto", healthcheck_path="/readyz")
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
