"""Repository-wide pytest settings.

Notebook kernels started by nbval inherit this process's environment, so the
quick profile and silent progress bars set here apply to them too.
"""

import os

os.environ.setdefault("CL_QUICK", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")
