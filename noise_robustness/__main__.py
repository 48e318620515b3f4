"""``python -m noise_robustness {fit,validate,test,predict,sweep} ...``"""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "sweep":
    from noise_robustness.sweep import run_sweep

    run_sweep(sys.argv[2:])
else:
    from noise_robustness.cli import cli_main

    cli_main()
