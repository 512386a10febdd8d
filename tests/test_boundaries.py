import subprocess
import sys


def test_importing_the_library_does_not_import_lightning():
    code = ("import sys, resnext_backbones, resnext_backbones.builders, resnext_backbones.formats; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'tasks')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
