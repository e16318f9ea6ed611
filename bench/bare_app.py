"""The Python-HTTP reference: a bare FastAPI + uvicorn app serving the same CatBoost file.

No authentication, validation, logging or metrics: JSON in, model, JSON out. It is what
"the cost of Python HTTP alone" means in bench/RESULTS.md. The model file and feature order come
from the environment (BENCH_MODEL_PATH, BENCH_FEATURES), set by bench/serving.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
from catboost import CatBoostClassifier
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
_model = CatBoostClassifier()
_model.load_model(os.environ["BENCH_MODEL_PATH"], format="cbm")
_features = os.environ["BENCH_FEATURES"].split(",")


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    records = json.loads(await request.body())["records"]
    x = np.array([[r[f] for f in _features] for r in records], dtype=np.float32)
    p = _model.predict_proba(x)[:, 1]
    return JSONResponse({"predictions": [{"label": -1 if q >= 0.5 else 1, "phishing_probability": float(q)}
                                         for q in p]})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
