"""Planning a run before paying for it: memory, time, data, checkpoints and cost of an experiment.

* ``devices``  - the cards (memory, peak, measured MFU and where it comes from), decode cost, S3 facts
* ``trace``    - one micro-batch's activations, traced on the meta device (nothing allocated)
* ``memory``   - model states under ZeRO stage / offload, buckets, the fit
* ``dataset``  - images, classes, bytes per sample and shards: from ``--data``'s index or stated defaults
* ``estimate`` - :func:`estimate` -> :class:`Plan` (``to_dict()`` is the CLI's JSON)
* ``fixes``    - the changes that make a run fit (cheapest first), or faster when it fits with room
* ``planner``  - :func:`plan`: the estimate plus its fixes
* ``report``   - the text the CLI prints

Pure computation: no Ray, MLflow or boto3 (``--data`` on S3 reads the index through the pipeline).
``python orchestration/plan.py`` is the command; docs/planning.md the guide.
"""

from orchestration.planning.dataset import DataFacts, default_facts, read_facts
from orchestration.planning.devices import DEVICES, Device, get_device
from orchestration.planning.estimate import Plan, at_scale, estimate
from orchestration.planning.planner import plan
from orchestration.planning.report import render

__all__ = ["DEVICES", "DataFacts", "Device", "Plan", "at_scale", "default_facts", "estimate", "get_device", "plan", "read_facts",
           "render"]
