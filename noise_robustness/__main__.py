"""``python -m noise_robustness {fit,validate,test,predict,sweep,certify} ...``"""

from noise_robustness.cli import cli_main
from noise_robustness.engine.memory import tune_allocator

tune_allocator()  # freed memory kept for the next step's tensors
cli_main()
