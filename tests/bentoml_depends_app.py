"""A BentoML service that depends on a running fusion server by URL (`bentoml.depends(FusionService,
url=...)`): tests/test_bentoml_client.py serves it to check BentoML's remote proxy against our twins."""

from __future__ import annotations

import os

import bentoml

from service.app import FusionService


@bentoml.service(name="fusion_caller")
class Caller:
    fusion = bentoml.depends(FusionService, url=os.environ.get("FUSION_DEPENDS_URL", "http://127.0.0.1:3000"))

    @bentoml.api
    async def predict_then_label(self, inputs: list[list[float]]) -> dict:
        """Predict with the ensemble through the proxy, then label the answer with its own predictions."""
        out = await self.fusion.predict(inputs=inputs, variant="ensemble")
        scored = await self.fusion.feedback(feedback_id=out["feedback_id"], labels=out["predictions"])
        return {"predict": out, "feedback": scored}
