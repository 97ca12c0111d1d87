"""The `platform` package stands in for the standard-library module, for every library and every worker."""

import os
import subprocess
import sys
import textwrap

import pytest

import platform as project_platform
from tests.helpers import ROOT, run_cli


def test_stdlib_functions_work_after_importing_the_platform(tmp_path):
    code = textwrap.dedent("""
        import pickle, uuid
        import platform.tune, platform.lensing
        import platform
        assert platform.__file__.endswith("platform/__init__.py"), platform.__file__
        assert platform.system() == "Linux"
        assert platform.python_version().count(".") == 2
        assert pickle.loads(pickle.dumps(platform.uname())) == platform.uname()
        uuid.uuid1(); uuid.uuid4()
        import ray, torch, mlflow, optuna  # each imports the standard `platform`
        print("ok", platform.machine(), platform.platform())
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


def test_python_m_platform_prints_the_platform_string(tmp_path):
    result = run_cli("platform", cwd=str(tmp_path))
    assert result.returncode == 0 and result.stdout.startswith("Linux-")


def test_no_submodule_shadows_a_standard_function():
    import importlib.util
    import sysconfig

    spec = importlib.util.spec_from_file_location("_std_platform", os.path.join(sysconfig.get_paths()["stdlib"], "platform.py"))
    standard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standard)
    package = os.path.dirname(project_platform.__file__)
    ours = {name[:-3] if name.endswith(".py") else name for name in os.listdir(package) if not name.startswith("_")}
    assert not ours & set(dir(standard)), ours & set(dir(standard))


@pytest.mark.slow  # real interpreters
def test_bare_pytest_and_python_m_pytest_both_work(tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    for command in ([os.path.join(bin_dir, "pytest")], [sys.executable, "-m", "pytest"]):
        result = subprocess.run([*command, "-q", "-p", "no:cacheprovider", "tests/test_config.py", "-k", "layers"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert result.returncode == 0 and "1 passed" in result.stdout, (command, result.stdout, result.stderr)


@pytest.mark.slow  # real interpreters
def test_a_task_from_another_package_through_an_entry_point(tmp_path):
    """A throwaway installed distribution adds a task; nothing in this repository is edited."""
    site = tmp_path / "site"
    package = site / "lensing_extra"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent("""
        import os
        from dataclasses import dataclass
        from platform.registry import Task, register
        import tasks.classification as base

        @dataclass
        class ExtraConfig:
            pass

        def register_tasks():
            register(Task(name="tiny_extra", config=ExtraConfig, build_model=base.build_model,
                          build_data=base.data.substructure, collate=base.collate, train_step=base.train_step,
                          eval_step=base.eval_step, evaluate=base.evaluate, metric="accuracy", mode="max",
                          search_space=os.path.join(os.path.dirname(__file__), "space.yaml")))
    """))
    # The plugin ships its own search space (with a bound out of range, to see that tune reads it).
    (package / "space.yaml").write_text("search:\n  train.epochs: {int: [0, 3]}\n")
    dist = site / "lensing_extra-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lensing-extra\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[deeplense_platform.tasks]\ntiny_extra = lensing_extra:register_tasks\n")
    result = run_cli("platform.tune", "--help", cwd=str(tmp_path), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert result.returncode == 0, result.stderr
    assert "tiny_extra" in result.stdout
    # And it is a real task: its config builds with the core's sections, strictly.
    result = run_cli("platform.train", "task=tiny_extra", "train.epochz=1", cwd=str(tmp_path),
                     env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert result.returncode == 2 and "did you mean 'train.epochs'" in result.stderr
    result = run_cli("platform.tune", "task=tiny_extra", cwd=str(tmp_path), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{site}"})
    assert result.returncode == 2, result.stderr
    assert "lensing_extra/space.yaml: train.epochs=0 is out of range" in result.stderr


def test_a_second_task_of_the_same_name_is_refused():
    # register() once replaced a task silently: which one a command got depended on import order.
    from platform import registry

    task = registry.get("classification")
    with pytest.raises(registry.DuplicateTaskError, match="task 'classification' is registered by both "
                                                          "tasks.classification and tests.test_platform_module"):
        registry.register(task)
    assert registry.get("classification") is task
