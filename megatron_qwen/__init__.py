"""megatron-qwen: a Megatron-style 3D-parallel trainer for the Qwen (v1) model family on megatron-core."""

import warnings

# megatron-core warns at import time, in every process, about each optional accelerator it does not find
# ("Apex is not installed. Falling back to Torch Norm", ...). A run says once what it is made of instead
# (the start-up line of megatron_qwen.platform.runtime.Runtime.describe).
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)
