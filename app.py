"""Sparsity Co-design Explorer: the page router. Each page describes its screen; the engine computes."""
import streamlit as st

from sparsity_app.core import env

env.configure()  # before any page imports TVM, PyTorch or transformers

st.set_page_config(page_title="Sparsity Co-design Explorer", page_icon=":material/grid_on:", layout="wide")

page = st.navigation([
    st.Page("app_pages/explore.py", title="Explore a layer", icon=":material/tune:", default=True),
    st.Page("app_pages/sweep.py", title="Sweep", icon=":material/grid_view:"),
    st.Page("app_pages/model.py", title="Whole model", icon=":material/account_tree:"),
    st.Page("app_pages/sensitivity.py", title="Layer sensitivity", icon=":material/stacked_bar_chart:"),
    st.Page("app_pages/recover.py", title="Recover accuracy", icon=":material/healing:"),
    st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
])
page.run()
