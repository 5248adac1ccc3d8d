/* The 1.3 layout build of the simulated runtime (runtime 1.3.0). */
#define RKLLM_SIM_ABI 13
#include "rkllm_sim.c"
