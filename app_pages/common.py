"""What every page shares: the result store, the engine call with live steps, the conditions line."""
from __future__ import annotations

import streamlit as st

from sparsity_app import Spec, UserError
from sparsity_app.experiment import run
from sparsity_app.store import Store


@st.cache_resource
def store() -> Store:
    return Store()


def run_with_status(spec: Spec):
    """Run the engine inside st.status, one line per step; a cached result appears at once.

    Returns the Result, or None after showing the error on the page.
    """
    try:
        with st.status(f"Running {spec.label()} at sparsity {spec.sparsity:g}...", expanded=True) as status:
            result = run(spec, store=store(), progress=lambda step, detail: status.write(f"**{step}**: {detail}"))
            status.update(label="Loaded from the cache" if result.cached else "Measured", state="complete",
                          expanded=False)
        return result
    except UserError as e:
        st.error(str(e))
    except Exception as e:  # the engine failed: say so on the page, keep the app alive
        st.error(f"The engine failed: {type(e).__name__}: {e}")
    return None


def conditions(result) -> str:
    m = result.machine
    return (f"Measured on {m.get('cpu')} ({result.kernel.get('mcpu', '?')}, {', '.join(m.get('isa', [])[-3:])}), "
            f"{result.spec.threads} threads, TVM {m.get('tvm')}, PyTorch {m.get('torch')}, "
            f"{result.spec.tokens} tokens, float32. Median of {result.times_ms['tvm_bsr'].runs} samples; "
            f"spread = interquartile range.")


def query_spec(default: Spec = Spec()) -> Spec:
    """The spec in the URL, with a visible note for each value that fell back to its default."""
    from sparsity_app.links import spec_from_query

    spec, notes = spec_from_query(dict(st.query_params), default)
    for note in notes:
        st.warning(note, icon=":material/link_off:")
    return spec
