"""The offline benchmark behind `python -m jaxinfer.launch.bench`: workloads, engine runners
(jaxinfer, llama.cpp, transformers), the machine's memory bandwidth, and the report."""
