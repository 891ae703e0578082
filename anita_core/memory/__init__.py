"""Memory policy: how much a training step holds and which layers keep, recompute or
offload their activations to fit a budget.

Layer: imports the model (and the kernels' constants); the model never imports it:
the model takes a policy value per layer (model.block.LayerPolicy) and this package
chooses them.

  planner   per-layer policies under a device/host budget, the predicted peak  (planner.py)
  replay    one train_step's allocations, tensor by tensor                      (replay.py)
  budget    the run's budgets (flags' MemoryRequest, defaults) and its plan      (budget.py)
  offload   the offloaded layers' inputs in one pinned host pool: HostOffload,
            the model's ActivationStash (model/stash.py), handed in by the plan  (offload.py)
"""
