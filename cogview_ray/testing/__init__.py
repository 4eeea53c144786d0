"""Test doubles for tests and chaos drills: the fault plan (`faults.py`) and `faulty://`
(`faulty_fs.py`). Never imported by the product; importing it registers `faulty://` with fsspec."""
import fsspec

from .faults import ENV, EXIT_CODE, FaultPlan, FaultSpecError, parse_spec
from .faulty_fs import FaultyFileSystem, StorageFaults

# clobber: a reload (or a second copy of the package on sys.path) replaces the class
fsspec.register_implementation(FaultyFileSystem.protocol, FaultyFileSystem, clobber=True)

__all__ = ["ENV", "EXIT_CODE", "FaultPlan", "FaultSpecError", "FaultyFileSystem", "StorageFaults", "parse_spec"]
