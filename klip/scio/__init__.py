"""SCIO: self-consistent iterative optimisation as a periodic, jitted rescoring pass.

`table`: the versioned pair table (per training example: dropped clause, rewritten values,
weight, last scores) and its picklable view joined to examples in the Grain pipeline.
`rescore`: the sharded scoring function and the pass (screen, proofread, reconstruct).
`schedule`: the stage schedule and the trainer's controller (active / pending tables, the
epoch-boundary switch, checkpoint payload, metrics).
"""
