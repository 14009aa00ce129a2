"""An example planning tool (docs/planning.md): load it with
``PYTHONPATH=docs/examples PGDAG_TOOLS=planner``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from engine.tools import ToolContext, tool


class PlanInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: list[str]
    after: list[str] = []  # more steps each new one waits for (they must have succeeded)


@tool("PLAN_TOPICS", PlanInput)
async def plan_topics(inp: PlanInput, ctx: ToolContext) -> dict[str, object]:
    """One research step per topic, then a summary that waits for all of them and reads
    the first one's output; all are added to the run when this step succeeds."""
    research = [f"research.{i}" for i in range(len(inp.topics))]
    ctx.add_steps(
        [
            {
                "name": name,
                "tool": "DELAY",
                "input": {"ms": 50 * (i + 1)},
                "dependsOn": [ctx.step_name, *inp.after],
            }
            for i, name in enumerate(research)
        ]
        + [
            {
                "name": "summary",
                "tool": "DELAY",
                "input": {"ms": {"$ref": "steps.research.0.output.tookMs"}},
                "dependsOn": research,
            }
        ]
    )
    return {"topics": inp.topics, "planned": len(research) + 1}
