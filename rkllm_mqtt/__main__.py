import sys

from rkllm_mqtt.cli import main

sys.exit(main())
