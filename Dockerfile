# megaswift on NVIDIA GPUs: NGC PyTorch image (CUDA, NCCL, TransformerEngine, flash-attn included).
FROM nvcr.io/nvidia/pytorch:25.09-py3
WORKDIR /opt/megaswift
COPY pyproject.toml README.md ./
COPY megaswift ./megaswift
RUN pip install --no-cache-dir -e . && python -c "import megaswift, megatron.core"
ENTRYPOINT ["megatron"]
