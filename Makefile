# Common tasks. Each target is a thin wrapper over a Python entry point that works without make;
# the command it runs is printed. Override the variables on the command line, e.g.
#   make compare COMPARE_ARGS="--device cuda --architecture GPT2-Small --seq_len 1024 --amp on"

PYTHON ?= python
LOGS ?= Results/logs
PLOTS ?= Results/plots

COMPARE_ARGS ?=
SWEEP_ARGS ?=
FIDELITY_ARGS ?=
DEMO_ARGS ?= --architecture GPT2-Tiny --max_steps 50 --batch_size 8 --seq_len 64 --warmup_step 5 \
	--learning_rate 1e-3 --eval_interval 25 --eval_iter 2 --eval_bs 4 --val_domain "DM Mathematics" \
	--run_name quickstart

.PHONY: install test demo compare profile-len profile-batch profile-amp profile-val profile-ckpt profile-attn \
	profile-all plots fidelity clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

demo:
	./train.sh $(DEMO_ARGS)

compare:
	$(PYTHON) -m benchmarks.compare --out $(LOGS)/compare.csv $(COMPARE_ARGS)

profile-len:
	$(PYTHON) -m benchmarks.profile_sweep --sweep seq_len --out $(LOGS)/profile_seq_len.csv $(SWEEP_ARGS)

profile-batch:
	$(PYTHON) -m benchmarks.profile_sweep --sweep batch_size --amp_settings both \
		--out $(LOGS)/profile_batch_size.csv $(SWEEP_ARGS)

profile-amp:
	$(PYTHON) -m benchmarks.profile_sweep --sweep amp --out $(LOGS)/profile_amp.csv $(SWEEP_ARGS)

profile-val:
	$(PYTHON) -m benchmarks.profile_sweep --sweep val_batch_size --out $(LOGS)/profile_val_batch_size.csv $(SWEEP_ARGS)

profile-ckpt:
	$(PYTHON) -m benchmarks.profile_sweep --sweep grad_ckpt --out $(LOGS)/profile_grad_ckpt.csv $(SWEEP_ARGS)

profile-attn:
	$(PYTHON) -m benchmarks.profile_sweep --sweep attn_impl --out $(LOGS)/profile_attn_impl.csv $(SWEEP_ARGS)

profile-all: profile-len profile-batch profile-amp profile-val profile-ckpt profile-attn

plots:
	$(PYTHON) -m benchmarks.plots --logs $(LOGS) --out $(PLOTS)

fidelity:
	$(PYTHON) -m benchmarks.fidelity --out Results/fidelity $(FIDELITY_ARGS)

# Benchmark outputs only: training runs under Results/ are never touched.
clean:
	rm -rf Results/logs Results/plots Results/fidelity
