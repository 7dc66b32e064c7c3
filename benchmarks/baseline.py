"""The naive baseline of `clipbank bench serve`: the zero-shot open_clip server a user would write first.

One request at a time (the handler computes on the event loop), no batching, no text cache: every request encodes
its images and its labels' prompts. It exists only to be measured against; it is not part of the service.

    python -m benchmarks.baseline --backbone ViT-B-32:openai --port 8001
"""

from __future__ import annotations

import argparse
import io
from typing import Annotated

import open_clip
import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from model_store.backbone import parse_backbone_ref


def create_baseline_app(backbone: str = "tiny") -> FastAPI:
    ref = parse_backbone_ref(backbone)
    model, _, preprocess = open_clip.create_model_and_transforms(ref.model_name, pretrained=ref.weights)
    tokenizer = open_clip.get_tokenizer(ref.model_name)
    model.eval()
    app = FastAPI(title="open_clip zero-shot (naive baseline)")

    @app.post("/classify")
    async def classify(images: Annotated[list[UploadFile], File()], labels: Annotated[list[str], Form()]):
        x = torch.stack([preprocess(Image.open(io.BytesIO(await f.read())).convert("RGB")) for f in images])
        with torch.no_grad():
            image_features = model.encode_image(x)
            text_features = model.encode_text(tokenizer([f"a photo of a {label}." for label in labels]))
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)
            probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
        return {"results": [{"labels": [[labels[j], float(p[j])] for j in p.argsort(descending=True)]} for p in probs]}

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    uvicorn.run(create_baseline_app(args.backbone), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
