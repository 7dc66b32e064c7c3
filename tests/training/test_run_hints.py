"""The trainer's hint when other work keeps the cores busy (`training.run.busy_machine`)."""

from training.run import busy_machine


def test_a_busy_machine_is_said_with_its_load_and_the_way_out():
    said = busy_machine(load=5.2, cores=2)
    assert said is not None and "load 5.2 on 2 cores" in said and "--threads 1" in said
    assert busy_machine(load=1.4, cores=2) is None  # idle enough: one thread per core is the faster
    assert busy_machine(load=9.0, cores=1) is None  # one core: one thread already
