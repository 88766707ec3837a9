#!/usr/bin/env bash
# STaR-GATE end to end: 01 (data) once, then 02 simulate -> 03 select -> 04 train for t = 0 .. T-1,
# then 05 evaluate. Every step skips work already done, so after a crash or Ctrl-C run the same
# command again and it finishes what is left, with nothing duplicated.
#
#   bash run_all.sh                  # the toy preset: a controlled world with scripted roles, where the real
#                                    # (embedded, warmed-up) Questioner's learning shows in minutes on a CPU
#   bash run_all.sh tiny             # the embedded 135M model in every role: every role a real LM, too weak to
#                                    # show the effect
#   bash run_all.sh laptop           # Mistral-7B-Instruct in 4-bit on one GPU
#   bash run_all.sh paper            # the paper's sizes and models
#   bash run_all.sh toy --ablations  # also the paper's two ablations, in runs/<preset>-gold, -none (--ablations
#                                    # may come first too)
#   ORIGINAL=<folder or URL prefix> bash run_all.sh released   # no training: the authors' released m1 and m2 beside
#                                    # m0 on the paper's own test split (the original release's files), as in paper
#
# RUN_DIR=... and CACHE_DIR=... override where outputs and caches go; SEED=1 draws other splits, personas and
# samples (default 0); DTYPE=float32 computes local models in fp32 (default auto: bf16 on a GPU or on a CPU
# with native bf16 matmuls). DRY_RUN=1 prints each step's command instead of running it.
#
# A step whose outputs exist checks that they were made with its settings (its args_<step>.json); if a setting
# that changes a result differs, it stops with an error naming it. OVERWRITE=1 redoes every step of the run with
# the new settings (--overwrite; not the toy preset's shared base model: pass --overwrite to toy_base.py itself);
# RUN_DIR=runs/<new> keeps the old run beside the new one.
#
# Any preset value can be overridden from the environment: QUESTIONER, ROLEPLAYER, ORACLE, JUDGE, ITERATIONS,
# N_TASKS, N_PERSONAS, N, TOP_K, TEST_PAIRS, EVAL_N, MODELS and the *_FLAGS below; a role the preset gives the
# Questioner's model (tiny: every role; laptop: Roleplayer, and Oracle and Judge without a key; released: m0)
# follows an overridden QUESTIONER:
#   QUESTIONER=hf:/models/my-7b-instruct bash run_all.sh laptop   # another 7B model, 4-bit, in those roles
#   N_TASKS="8 8 4" N_PERSONAS="2 2 2" TEST_PAIRS=8 TRAIN_FLAGS="--batch_size 2" bash run_all.sh laptop
# SERVED_QUESTIONER=openai:<model>@<url> runs 02/03/05's Questioner Q_t and Q_BASE scorer on that server (the base
# model with each iteration's adapter, docs/CLUSTER.md); 04 still trains QUESTIONER, which names the tokenizer.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=""; ABLATIONS=""
for arg in "$@"; do  # a preset and --ablations, in either order
  case "$arg" in
    --ablations) ABLATIONS="--ablations" ;;
    *) [ -z "$PRESET" ] && [ "${arg#-}" = "$arg" ] || {
         echo "error: unknown argument '$arg': bash run_all.sh [preset] [--ablations]" >&2; exit 2; }
       PRESET="$arg" ;;
  esac
done
PRESET="${PRESET:-toy}"
OVERWRITE_FLAG=""; [ -z "${OVERWRITE:-}" ] || [ "$OVERWRITE" = 0 ] || OVERWRITE_FLAG="--overwrite"
CACHE_DIR="${CACHE_DIR:-cache}"
START=$SECONDS

# Any of these set in the environment replaces the preset's value (even when set empty): the presets below
# only give defaults, `: "${VAR=value}"`, which assign where VAR is unset.
OVERRIDABLE="QUESTIONER ROLEPLAYER ORACLE JUDGE ITERATIONS N_TASKS N_PERSONAS N TOP_K TEST_PAIRS EVAL_N MODELS
  MODEL_FLAGS SIM_FLAGS GEN_FLAGS SELECT_FLAGS TRAIN_FLAGS EVAL_FLAGS"
for var in $OVERRIDABLE; do  # said aloud: a variable left in the shell must not change a run unnoticed
  [ -z "${!var+set}" ] || echo "from the environment: $var=${!var}"
done
if [ -n "${DRY_RUN:-}" ]; then  # print each step's command (as a shell would read it) instead of running it
  python() { printf 'python'; printf ' %q' "$@"; echo; }
fi
BASE_MODEL=""; FROM_ORIGINAL=""  # the toy preset's once-only base model; the released preset's original data

# --- Presets: every value that differs between them, in one place ---------------------------------
# MODEL_FLAGS go to every step (models.ModelSettings; --batch_tokens bounds rows x padded length of a batch,
# and so the peak memory of generation and scoring); SIM_FLAGS to 02 and 05 alike (02_simulate.py's
# SimulationSettings), so evaluation simulates conversations exactly as training did; GEN_FLAGS, SELECT_FLAGS,
# TRAIN_FLAGS and EVAL_FLAGS to one step each. A role given as $QUESTIONER follows an overridden Questioner.
case "$PRESET" in
  tiny)    # the embedded SmolLM2-135M in every role; sizes that finish in minutes on 2 CPU cores
    : "${QUESTIONER=embedded}" "${ROLEPLAYER=$QUESTIONER}" "${ORACLE=$QUESTIONER}" "${JUDGE=$QUESTIONER}"
    : "${ITERATIONS=2}" "${N_TASKS=4 4 3}" "${N_PERSONAS=3 3 3}" "${N=3}" "${TOP_K=1}" "${TEST_PAIRS=9}"
    : "${MODEL_FLAGS=--batch_tokens 32768}"
    : "${SIM_FLAGS=--question_max_tokens 64 --answer_max_tokens 48}"
    : "${GEN_FLAGS=--persona_max_tokens 120 --gold_max_tokens 96}"
    : "${SELECT_FLAGS=--answer_max_tokens 96}"
    : "${TRAIN_FLAGS=--learning_rate 5e-4 --epochs 2 --batch_size 1 --grad_accum 4 --lora_r 8 --lora_dropout 0}"
    : "${EVAL_FLAGS=--final_max_tokens 96 --judge_max_tokens 64 --batch_size 16}"
    ;;
  smoke)   # the test suite's preset: the smallest sizes that still exercise every step (seconds per step)
    : "${QUESTIONER=embedded}" "${ROLEPLAYER=$QUESTIONER}" "${ORACLE=$QUESTIONER}" "${JUDGE=$QUESTIONER}"
    : "${ITERATIONS=2}" "${N_TASKS=2 2 2}" "${N_PERSONAS=1 1 2}" "${N=2}" "${TOP_K=1}" "${TEST_PAIRS=3}"
    : "${MODEL_FLAGS=--batch_tokens 32768}"
    : "${SIM_FLAGS=--question_max_tokens 12 --answer_max_tokens 12 --max_turns 2}"
    : "${GEN_FLAGS=--persona_max_tokens 48 --gold_max_tokens 24 --n_examples 1}"
    : "${SELECT_FLAGS=--answer_max_tokens 16}"
    : "${TRAIN_FLAGS=--learning_rate 1e-3 --epochs 2 --warmup_ratio 0 --batch_size 2 --grad_accum 1 --lora_r 4}"
    : "${EVAL_FLAGS=--final_max_tokens 16 --judge_max_tokens 8}"
    ;;
  toy)     # a controlled world (data/toy, scripted.py) where the effect of good questions is known: the real
           # embedded Questioner, trained by the same steps, with a scripted Oracle, Roleplayer and Judge.
           # For seeing the mechanism work on a CPU in minutes; NOT the paper's setting.
           # Q_BASE is the embedded model warmed up once on answering with what the user told (toy_base.py),
           # built here unless another Questioner is given.
    : "${QUESTIONER=hf:$CACHE_DIR/toy-base}"
    [ "$QUESTIONER" != "hf:$CACHE_DIR/toy-base" ] ||
      BASE_MODEL="python toy_base.py --out $CACHE_DIR/toy-base --cache_dir $CACHE_DIR --dtype ${DTYPE:-auto}"
    : "${ROLEPLAYER=scripted:data/toy}" "${ORACLE=scripted:data/toy}" "${JUDGE=scripted:data/toy}"
    : "${ITERATIONS=2}" "${N_TASKS=24 24 24}" "${N_PERSONAS=3 3 5}" "${N=4}" "${TOP_K=1}" "${TEST_PAIRS=120}"
    : "${EVAL_N=2}"
    : "${MODEL_FLAGS=--batch_tokens 32768}"
    : "${SIM_FLAGS=--question_max_tokens 24}"
    : "${GEN_FLAGS=--tasks data/toy/tasks.jsonl --stratify_by attributes}"  # every test task has its family in A, B
    : "${SELECT_FLAGS=--answer_max_tokens 40}"
    : "${TRAIN_FLAGS=--learning_rate 1e-3 --epochs 2 --batch_size 1 --grad_accum 4 --lora_r 8 --lora_dropout 0 --no_gradient_checkpointing}"
    : "${EVAL_FLAGS=--final_max_tokens 40 --judge_all_conversations}"
    ;;
  laptop)  # Mistral-7B-Instruct-v0.2 in 4-bit as Questioner and Roleplayer (one shared copy);
           # Oracle and Judge through an OpenAI-compatible API when OPENAI_API_KEY is set
    : "${QUESTIONER=hf:mistralai/Mistral-7B-Instruct-v0.2}" "${ROLEPLAYER=$QUESTIONER}"
    if [ -n "${OPENAI_API_KEY:-}" ]; then : "${ORACLE=openai:gpt-4o}" "${JUDGE=openai:gpt-4o}"
    else : "${ORACLE=$QUESTIONER}" "${JUDGE=$QUESTIONER}"; fi
    : "${ITERATIONS=2}" "${N_TASKS=40 40 20}" "${N_PERSONAS=10 10 5}" "${N=4}" "${TOP_K=1}" "${TEST_PAIRS=100}"
    : "${MODEL_FLAGS=--load_in_4bit yes --batch_tokens 16384}"
    : "${SIM_FLAGS=}" "${GEN_FLAGS=}" "${SELECT_FLAGS=}" "${EVAL_FLAGS=}"
    : "${TRAIN_FLAGS=--batch_size 4 --grad_accum 4}"
    ;;
  paper)   # Sec. 4: Mistral-7B Questioner, Mixtral-8x7B Roleplayer, GPT-4 Oracle and Judge, 3 iterations;
           # the Roleplayer on a vLLM server (docs/CLUSTER.md has the command; ROLEPLAYER=... points elsewhere);
           # the paper's 550 tasks from the hub (needs `pip install datasets` and the network; data/ has 120)
    : "${QUESTIONER=hf:mistralai/Mistral-7B-Instruct-v0.2}"
    : "${ROLEPLAYER=openai:mistralai/Mixtral-8x7B-Instruct-v0.1@http://127.0.0.1:8001/v1}"
    : "${ORACLE=openai:gpt-4}" "${JUDGE=openai:gpt-4}"
    : "${ITERATIONS=3}" "${N_TASKS=250 250 50}" "${N_PERSONAS=50 50 10}" "${N=10}" "${TOP_K=1}" "${TEST_PAIRS=300}"
    : "${MODEL_FLAGS=--batch_tokens 16384}" "${SIM_FLAGS=}" "${SELECT_FLAGS=}" "${TRAIN_FLAGS=}" "${EVAL_FLAGS=}"
    : "${GEN_FLAGS=--tasks hf:Dahoas/instruct-human-assistant-prompt}"
    ;;
  released) # no training: the paper's own test split (the original release's files: ORIGINAL=<their folder, or a URL
            # prefix>) and the authors' released Questioners (full weights on the hub) evaluated beside m0 (also
            # Q_BASE) with 05's protocol, the Roleplayer and Judge as in paper; README, "The paper's own test set"
    FROM_ORIGINAL="${ORIGINAL:-}"
    [ -n "$FROM_ORIGINAL" ] || { echo "error: the released preset reads the original release's test split: set" \
      "ORIGINAL to its folder (star-gate-hgx/... of scandukuri/assistant-gate) or a URL prefix" >&2; exit 2; }
    [ -z "$ABLATIONS" ] || { echo "error: the released preset trains nothing, so it has no ablations" >&2; exit 2; }
    : "${QUESTIONER=hf:mistralai/Mistral-7B-Instruct-v0.2}"
    : "${MODELS=m0=$QUESTIONER m1=hf:scandukuri/mistral-stargate-m1 m2=hf:scandukuri/mistral-stargate}"
    : "${ROLEPLAYER=openai:mistralai/Mixtral-8x7B-Instruct-v0.1@http://127.0.0.1:8001/v1}"
    : "${ORACLE=}" "${JUDGE=openai:gpt-4}"
    : "${ITERATIONS=0}" "${N_TASKS=}" "${N_PERSONAS=}" "${N=10}" "${TOP_K=1}" "${TEST_PAIRS=300}"
    : "${MODEL_FLAGS=--batch_tokens 16384}" "${SIM_FLAGS=}" "${GEN_FLAGS=}" "${SELECT_FLAGS=}" "${TRAIN_FLAGS=}"
    : "${EVAL_FLAGS=}"
    ;;
  *) echo "unknown preset '$PRESET': use tiny, toy, laptop, paper, released (or smoke, for the tests)" >&2; exit 2 ;;
esac
: "${MODELS=}"  # only the released preset names its models (05 --models)
EVAL_N="${EVAL_N:-$N}"  # test conversations per pair (the toy preset uses fewer than in training)
ABLATION_TARGETS="${ABLATION_TARGETS:-gold none}"  # with --ablations: the paper's two, or the preset's choice
RUN_DIR="${RUN_DIR:-runs/$PRESET}"
COMMON="--cache_dir $CACHE_DIR --seed ${SEED:-0} --dtype ${DTYPE:-auto} $MODEL_FLAGS"
STEP="$COMMON $OVERWRITE_FLAG"  # the flags of every step of a run
ASK="${SERVED_QUESTIONER:-$QUESTIONER}"  # 02/03/05's Questioner and scorer: local, or on a server
ASK_FLAGS=""; [ -z "${SERVED_QUESTIONER:-}" ] || ASK_FLAGS="--tokenizer $QUESTIONER"

run_method() {  # $1 = run folder, $2 = final message trained on (own | gold | none)
  local dir="$1" target="$2"
  for ((t = 0; t < ITERATIONS; t++)); do
    echo "== $dir: iteration $t =="
    python 02_simulate.py --run_dir "$dir" --iteration "$t" --questioner "$ASK" --roleplayer "$ROLEPLAYER" \
      --n_conversations "$N" $STEP $ASK_FLAGS $SIM_FLAGS
    python 03_select.py --run_dir "$dir" --iteration "$t" --questioner "$ASK" --top_k "$TOP_K" --target "$target" \
      $STEP $ASK_FLAGS $SELECT_FLAGS  # N: the one 02 simulated (its record)
    python 04_train.py --run_dir "$dir" --iteration "$t" --questioner "$QUESTIONER" $STEP $TRAIN_FLAGS
  done
}

if [ -n "$BASE_MODEL" ]; then
  echo "== $QUESTIONER: the preset's base model =="
  $BASE_MODEL
fi
echo "== $RUN_DIR: data =="
if [ -n "$FROM_ORIGINAL" ]; then  # the original release's test split as it is: nothing generated
  python 01_generate.py --run_dir "$RUN_DIR" --from_original "$FROM_ORIGINAL" $STEP $GEN_FLAGS
else
  python 01_generate.py --run_dir "$RUN_DIR" --oracle "$ORACLE" --n_tasks $N_TASKS --n_personas $N_PERSONAS \
    $STEP $GEN_FLAGS
fi
run_method "$RUN_DIR" own

EVAL_RUNS=()
if [ "$ABLATIONS" = "--ablations" ]; then
  # The paper's ablations share the data and the iteration-0 conversations of m0 and their scores.
  for target in $ABLATION_TARGETS; do
    dir="$RUN_DIR-$target"
    [ -z "$OVERWRITE_FLAG" ] || rm -rf "$dir"  # made again from the run's new data and conversations
    mkdir -p "$dir/iter0"
    [ -e "$dir/data" ] || ln -s "$(cd "$RUN_DIR" && pwd)/data" "$dir/data"
    for file in conversations.jsonl args_02_simulate.json scores.jsonl; do  # the same conversations, scored
      [ -e "$dir/iter0/$file" ] || cp "$RUN_DIR/iter0/$file" "$dir/iter0/"  # by the same Q_BASE
    done
    STEP="$COMMON" run_method "$dir" "$target"  # no --overwrite: it would redo the shared conversations
    EVAL_RUNS+=("$dir")
  done
fi

evaluate() {  # $1 = run folder, then extra flags
  local dir="$1"; shift
  local models=(--iterations "$ITERATIONS" --questioner "$ASK")  # the run's own m0 .. mT
  [ -z "$MODELS" ] || models=(--models $MODELS)  # or the named models, the first the baseline and Q_BASE
  python 05_eval.py --run_dir "$dir" "${models[@]}" \
    --roleplayer "$ROLEPLAYER" --judge "$JUDGE" --n_conversations "$EVAL_N" --test_pairs "$TEST_PAIRS" \
    $COMMON $ASK_FLAGS $SIM_FLAGS $EVAL_FLAGS "$@"
}
echo "== $RUN_DIR: evaluation =="
evaluate "$RUN_DIR" $OVERWRITE_FLAG
if [ ${#EVAL_RUNS[@]} -gt 0 ]; then
  for dir in "${EVAL_RUNS[@]}"; do
    echo "== $dir: evaluation (m0 shared with $RUN_DIR) =="
    evaluate "$dir" --baseline_dir "$RUN_DIR"
  done
  evaluate "$RUN_DIR" --ablation_dirs "${EVAL_RUNS[@]}"  # finished: only the report is written again
fi
echo "Report: $RUN_DIR/eval/report.md (metrics: $RUN_DIR/eval/metrics.json); $(((SECONDS - START) / 60)) min $(((SECONDS - START) % 60)) s"
