"""``python -m noise_robustness {fit,validate,test,predict,sweep} ...``"""

from noise_robustness.cli import cli_main

cli_main()
