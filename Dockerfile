# lora_grpo on a CUDA GPU: the library, the `lora-grpo` CLI and the shipped recipes.
#   docker build -t lora-grpo .
#   docker run --rm lora-grpo train toyworld
#   docker run --rm --gpus all -e HF_TOKEN -v $PWD/runs:/work/runs lora-grpo train sd14-nudity-compact
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LORA_GRPO_HOME=/cache/lora_grpo

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lora_grpo ./lora_grpo
COPY recipes ./recipes
COPY hub ./hub
# torch comes from the base image; pip keeps it because it satisfies torch>=2.4
RUN pip install ".[datasets,eval,trackers]" && rm -rf /src/build

WORKDIR /work
VOLUME ["/cache", "/work/runs"]
ENTRYPOINT ["lora-grpo"]
CMD ["--help"]
