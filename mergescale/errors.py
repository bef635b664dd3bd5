"""The errors a merge reports to its user instead of a result (exit status 2 on the command line). Each message
names the file, tensor, field or directory at fault and what was expected. No imports: every layer raises them."""

from __future__ import annotations


class MergeInputError(ValueError):
    """Inputs that cannot be merged as configured; the message names models, files and tensors.

    `keep_partial`: whether the partial output stays for a rerun to resume (the fault is outside the inputs and
    the work done is sound), or is removed (bad data: a rerun would fail the same way)."""

    keep_partial = False


class InputsChanged(MergeInputError):
    """Input bytes differ from those an earlier read of the same rows saw (merge.input_digests)."""


class NoSpaceError(MergeInputError):
    """The output's file system has no room for what the merge still has to write."""

    keep_partial = True


class OutputInTheWay(MergeInputError):
    """The finished merge cannot be moved into place: something else holds the output path."""

    keep_partial = True
