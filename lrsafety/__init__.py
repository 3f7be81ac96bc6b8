"""lrsafety: reproduction helpers for "Low-Resource Safety Failures Are Action Failures,
Not Representation Failures".

One module per concept: languages, data, prompts, models and stand-ins, activations,
directions, metrics, thresholds, gate, steering, judges, runs, figures, runner, report, cli.
"""

import logging

__version__ = "0.1.0"

logging.getLogger("lrsafety").addHandler(logging.NullHandler())
