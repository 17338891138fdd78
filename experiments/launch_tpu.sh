#!/usr/bin/env bash
# Trains a video DiT of configs/video_dit.py on the Cloud TPU slice its size is written for:
# creates the slice (unless it exists), installs sora_jax on every worker, copies the clips and
# the pretrained VAE and text encoder to /data on each, builds the dataset once, then starts the
# same `python -m sora_jax.train ... --distributed` on all workers at once.
#
#   experiments/launch_tpu.sh SIZE ZONE BUCKET
#
#   SIZE    100M | 1B | 3B | 10B, which picks the slice:
#             100M  v6e-8     mesh data 8
#             1B    v5p-32    mesh fsdp 16
#             3B    v5p-128   mesh fsdp 16 x tensor 4
#             10B   v5p-512   mesh fsdp 64 x tensor 2 x sequence 2
#   ZONE    a zone that has the accelerator (e.g. us-east5-a for v5p, us-east5-b for v6e)
#   BUCKET  a Cloud Storage bucket (name only) holding
#             clips/      your videos and captions.csv (sora_jax/data/video_folder.py)
#             wan_vae/    the Wan 2.1 VAE in diffusers layout (config.json + safetensors)
#             umt5_xxl/   UMT5-XXL in HF layout (config.json, safetensors, spiece.model)
#           to which the run writes tfds/ (the packed dataset) and runs/video_dit_SIZE/.
#
# Optional environment: NAME (the slice, default sora-SIZE lower-cased), PROJECT (gcloud
# project), REPO and REF (what to clone; default this checkout's origin and commit), SPOT=1 (spot
# capacity), EXTRA (more flags for train, e.g. "--config.train.num_steps=1000").
#
# Rerunning the same command resumes: the slice, the install and the data are reused, and training
# continues from the workdir's latest checkpoint. Logs: ~/train_SIZE.log on every worker, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=0 --command='tail -f ~/train_SIZE.log'
# Delete the slice when done: gcloud compute tpus tpu-vm delete NAME --zone=ZONE
set -euo pipefail

if [[ $# -ne 3 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
SIZE=$1 ZONE=$2 BUCKET=${3#gs://}

case "$SIZE" in
  100M) ACCELERATOR=v6e-8;   VERSION=v2-alpha-tpuv6e ;;
  1B)   ACCELERATOR=v5p-32;  VERSION=v2-alpha-tpuv5 ;;
  3B)   ACCELERATOR=v5p-128; VERSION=v2-alpha-tpuv5 ;;
  10B)  ACCELERATOR=v5p-512; VERSION=v2-alpha-tpuv5 ;;
  *) echo "Unknown SIZE=$SIZE; valid: 100M 1B 3B 10B." >&2; exit 2 ;;
esac

NAME=${NAME:-sora-$(echo "$SIZE" | tr '[:upper:]' '[:lower:]')}
REPO=${REPO:-$(git -C "$(dirname "$0")" remote get-url origin 2>/dev/null || true)}
REF=${REF:-$(git -C "$(dirname "$0")" rev-parse HEAD 2>/dev/null || true)}
if [[ -z $REPO || -z $REF ]]; then
  echo "Set REPO (a git URL the workers can clone) and REF (a branch or commit)." >&2; exit 2
fi
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
WORKDIR=gs://$BUCKET/runs/video_dit_$SIZE
DATA_DIR=gs://$BUCKET/tfds

on_workers() {  # on_workers WORKERS COMMAND: runs COMMAND on those workers ("all" or an index)
  "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

echo "== $SIZE on $ACCELERATOR ($NAME, $ZONE), workdir $WORKDIR"
if ! "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" >/dev/null 2>&1; then
  "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" ${SPOT:+--spot}
fi

echo "== installing sora_jax ($REF) and copying the data on every worker"
on_workers all "set -e
  [ -d sora_jax ] || git clone -q '$REPO' sora_jax
  cd sora_jax && git fetch -q origin && git checkout -q '$REF'
  [ -d .venv ] || python3 -m venv .venv
  .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'
  sudo mkdir -p /data && sudo chown \"\$USER\" /data
  for part in clips wan_vae umt5_xxl; do
    gcloud storage rsync --recursive gs://$BUCKET/\$part /data/\$part
  done"

echo "== building the dataset once (worker 0), into $DATA_DIR"
on_workers 0 "cd sora_jax && .venv/bin/python -c '
from configs import video_dit
from sora_jax.data import pipeline
data = video_dit.get_config(\"$SIZE\").data
data.data_dir = \"$DATA_DIR\"
kw = pipeline.data_kwargs(data)
pipeline.prepare(kw[\"name\"], kw[\"builder_config\"], kw[\"data_dir\"])'"

echo "== training on every worker"
on_workers all "cd sora_jax
  TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4  # fewer page faults, as on every TPU VM job
  [ -f \$TCMALLOC ] && export LD_PRELOAD=\$TCMALLOC
  nohup .venv/bin/python -m sora_jax.train \
    --config=configs/video_dit.py:$SIZE --workdir=$WORKDIR --distributed \
    --config.data.data_dir=$DATA_DIR --config.data.folder=/data/clips \
    --config.autoencoder.path=/data/wan_vae --config.text.path=/data/umt5_xxl ${EXTRA:-} \
    > ~/train_$SIZE.log 2>&1 < /dev/null &"
echo "Started. Follow worker 0:"
echo "  ${GCLOUD[*]} ssh $NAME --zone=$ZONE --worker=0 --command='tail -f ~/train_$SIZE.log'"
