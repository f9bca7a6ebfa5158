"""The rehearsal kernel's entry point: the pretend card (:mod:`tests.rehearsal.kernel`), then a plain ipykernel.

Importing before the kernel starts works with every ipykernel the course admits (``exec_lines`` is
ignored by ipykernel 6.3), and the notebook's first cell finds the patches in place.
"""

if __name__ == "__main__":
    import tests.rehearsal.kernel  # noqa: F401
    from ipykernel.kernelapp import launch_new_instance

    launch_new_instance()
