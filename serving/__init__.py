"""flora-serve.

flora_hf is imported first: it registers its PEFT methods and quiets a bitsandbytes import-time warning, which must
happen before anything here imports PEFT.
"""

import flora_hf  # noqa: F401
