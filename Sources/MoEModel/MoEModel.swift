import MoECompute
