"""Sampling in canonical time, for any family and any model with its forward: the samplers people
evaluate with (:mod:`.samplers`), their single steps (:mod:`.steppers`) and where the steps go
(:mod:`.schedules`, :mod:`.model_schedules`).

Used to draw the teacher's own samples for data-free profiling and distillation, and by anyone who
wants to sample a routed checkpoint without the family's original sampling code.
"""

from cbs_convert.sample.samplers import sample_ode
from cbs_convert.sample.steppers import data_stepper, split_velocity

__all__ = ["data_stepper", "sample_ode", "split_velocity"]
