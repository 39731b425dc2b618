"""attnmem's torch.library operators, registered for a low per-call cost.

`custom_op` below takes torch.library.custom_op's arguments and offers its API (calling the
op, register_fake, register_autograd) with its behaviour: an operator torch.ops.attnmem.<name>
whose schema comes from the function's annotations, differentiable at the operator (an
Autograd-key kernel running a torch.autograd.Function), that torch.compile, fake tensors and
torch.library.opcheck take as they took the custom_op. It registers with
torch.library.define and impl instead, which skips what makes custom_op slow per call: the
defaults of the whole schema filled in on each call (twice where the op mutates an input or
has a derivative) and its Python checks. Measured on a 2-core CPU with torch 2.13, a
15-argument op that mutates two tensors (kvcache_append) costs 66 us a call as a custom_op
and 3 us so; an 11-argument op with a derivative, 55 us against 20 when an input requires
grad. Where an op's kernel takes microseconds (decoding a token, a Neural Turing Machine's
step) that was most of the call.
"""

import inspect

import torch

_LIB = torch.library.Library("attnmem", "FRAGMENT")


class Operator:
    """torch.ops.attnmem.<name>.default (`default`), called with its Python function's
    arguments, keywords and defaults included."""

    def __init__(self, name: str, fn, mutates_args):
        self.name = name
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        self.default = getattr(torch.ops.attnmem, name).default
        params = list(inspect.signature(fn).parameters.values())
        if any(p.kind == p.KEYWORD_ONLY for p in params):
            raise TypeError(f"attnmem::{name}: keyword-only arguments are not taken")
        mutated = [i for i, p in enumerate(params) if p.name in mutates_args]
        _LIB.impl(name, _bumping_versions(fn, mutated) if mutated else fn,
                  "CompositeExplicitAutograd")
        _LIB.impl(name, self._autograd_kernel, "Autograd", with_keyset=True)
        # The dispatcher leaves out trailing arguments equal to their defaults.
        self._defaults = tuple(p.default for p in params)
        self.register_autograd(_no_derivative(name), setup_context=_no_context)

    def __call__(self, *args, **kwargs):
        return self.default(*args, **kwargs)

    def register_fake(self, fn):
        """fn computes the outputs' metadata under fake tensors (torch.compile, export)."""
        torch.library.register_fake(self.default, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward, *, setup_context):
        """torch.library.register_autograd's contract: setup_context(ctx, inputs, output),
        inputs holding every argument (defaults filled in), then backward(ctx, *grads) -> a
        gradient or None per argument."""
        op, defaults = self.default, self._defaults

        def forward(ctx, *args):
            *args, keyset = args
            with torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset, *args)
            setup_context(ctx, (*args, *defaults[len(args):]), output)
            return output

        def differentiated(ctx, *grads):
            # The keyset, the last argument of forward, is no input of the op.
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:-1]
            try:
                grads = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            return (*grads, None) if isinstance(grads, tuple) else (grads, None)

        self._function = type(f"{self.name}_function", (torch.autograd.Function,),
                              dict(forward=staticmethod(forward),
                                   backward=staticmethod(differentiated)))

    def _autograd_kernel(self, keyset, *args):
        below = keyset & torch._C._after_autograd_keyset
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return self._function.apply(*args, below)
        with torch._C._AutoDispatchBelowAutograd():
            return self.default.redispatch(below, *args)


def custom_op(name: str, *, mutates_args):
    """Decorator: fn (annotated as torch.library.custom_op asks) as the operator
    attnmem::name, mutating the arguments named in mutates_args."""
    return lambda fn: Operator(name, fn, tuple(mutates_args))


def _bumping_versions(fn, mutated):
    """fn, then a version bump of the tensors at positions `mutated`, as torch's in-place
    ops bump theirs: a backward that saved one of them before raises rather than reading
    the new values."""

    def mutating(*args):
        result = fn(*args)
        for i in mutated:  # inference tensors keep no version
            if not args[i].is_inference():
                torch.autograd.graph.increment_version(args[i])
        return result

    return mutating


def _no_context(ctx, inputs, output):
    pass


def _no_derivative(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"attnmem::{name} has no derivative: nothing registered one")

    return backward
