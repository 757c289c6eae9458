"""cl_lib: contrastive learning through supervised objectives.

The companion library of the book. Submodules:

* :mod:`cl_lib.losses` - the loss family (prototype objectives, balanced
  contrastive loss, NT-Xent, decoupled, SupCon, debiased);
* :mod:`cl_lib.runtime` - the quick/full profile, seeding, progress bars;
* :mod:`cl_lib.plotting` - the book's figure style.
"""

from cl_lib.runtime import default_device, is_quick, profile, progress, seed_everything

__version__ = "0.1.0"

__all__ = ["__version__", "default_device", "is_quick", "profile", "progress", "seed_everything"]
