/* The 1.2 layout build of the simulated runtime (runtimes 1.2.1-1.2.3). */
#define RKLLM_SIM_ABI 12
#include "rkllm_sim.c"
