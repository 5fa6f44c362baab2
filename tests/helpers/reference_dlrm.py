"""An independent, plain-PyTorch DLRM for checking the sharded trainer: nn-free tensors,
embedding bags as explicit sums, the interaction written from the reference's formula, and
the optimizers written out by hand."""

import math
from typing import Dict, List

import torch


class ReferenceDLRM:
    """Parameters are plain tensors: tables[f] (n_f x d), bottom/top lists of (W, b)."""

    def __init__(self, tables: List[torch.Tensor], bottom, top, interaction: str,
                 self_interaction: bool = False):
        self.tables = [t.clone().double().requires_grad_() for t in tables]
        self.bottom = [(w.clone().double().requires_grad_(), b.clone().double().requires_grad_())
                       for w, b in bottom]
        self.top = [(w.clone().double().requires_grad_(), b.clone().double().requires_grad_())
                    for w, b in top]
        self.interaction = interaction
        self.self_interaction = self_interaction
        self.state: Dict[int, torch.Tensor] = {}

    def dense_params(self):
        return [p for layer in self.bottom + self.top for p in layer]

    @staticmethod
    def _mlp(x, layers, last_relu):
        for i, (w, b) in enumerate(layers):
            x = x @ w.T + b
            if last_relu or i < len(layers) - 1:
                x = torch.relu(x)
        return x

    def forward(self, dense, ids: List[List[List[int]]]):
        """dense: B x D; ids[f][i]: the bag of sample i for feature f. Returns logits B."""
        x = self._mlp(dense.double(), self.bottom, True)
        pooled = self.pooled(ids, x.shape[0])
        if self.interaction == "cat":
            r = torch.cat([x] + pooled, dim=1)
        else:
            t = [x] + pooled
            feats = [x]
            for i in range(len(t)):
                for j in range(i + (1 if self.self_interaction else 0)):
                    feats.append((t[i] * t[j]).sum(1, keepdim=True))
            r = torch.cat(feats, dim=1)
        return self._mlp(r, self.top, False).squeeze(-1)

    @staticmethod
    def bag_sum(table, bag):
        """The sum of a bag's rows (zeros for an empty bag)."""
        return table[bag].sum(0) if bag else torch.zeros(table.shape[1], dtype=table.dtype)

    def pooled(self, ids, batch_size: int) -> List[torch.Tensor]:
        """Per feature, the B x d sums of each sample's bag."""
        return [torch.stack([self.bag_sum(table, ids[f][i]) for i in range(batch_size)])
                for f, table in enumerate(self.tables)]

    def sgd_step(self, loss, lr):
        params = self.tables + self.dense_params()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g

    def rowwise_adagrad_tables_adagrad_dense_step(self, loss, lr, eps):
        """Row-wise Adagrad on tables (state: mean of squared row gradient), Adagrad on
        dense parameters: w -= lr * g / (sqrt(G) + eps)."""
        params = self.tables + self.dense_params()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for k, (p, g) in enumerate(zip(params, grads)):
                if k < len(self.tables):
                    touched = g.abs().sum(1) > 0  # the fused kernel skips absent rows
                    st = self.state.setdefault(k, torch.zeros(p.shape[0], dtype=p.dtype))
                    st += (g * g).mean(1) * touched
                    denom = st.sqrt().unsqueeze(1) + eps
                    p -= lr * g / denom
                else:
                    st = self.state.setdefault(k, torch.zeros_like(p))
                    st += g * g
                    p -= lr * g / (st.sqrt() + eps)


def bce_mean(logits, labels):
    p = torch.sigmoid(logits)
    return -(labels * torch.log(p) + (1 - labels) * torch.log(1 - p)).mean()


def unpack_kjt(kjt, keys) -> List[List[List[int]]]:
    out = []
    for key in keys:
        jt = kjt[key]
        vals = jt.values().tolist()
        offs = [0] + torch.cumsum(jt.lengths(), 0).tolist()
        out.append([vals[offs[i]:offs[i + 1]] for i in range(len(offs) - 1)])
    return out


def assemble(pieces_per_rank, shape):
    """Full tensor from every rank's (row, col, piece) list."""
    full = torch.full(shape, math.nan, dtype=torch.float64)
    for pieces in pieces_per_rank:
        for r, c, t in pieces:
            if t.dim() == 1:
                full[r:r + t.shape[0]] = t.double()
            else:
                full[r:r + t.shape[0], c:c + t.shape[1]] = t.double()
    return full


def parity_failures(label, outs, ref, table_names, logits0, losses, dense_names, steps, tol):
    """Differences between the ranks' saved outputs (parity_worker) and the reference: the
    initial logits, the per-step losses, every table and every dense parameter."""
    import torch

    failures = []
    got_logits = torch.cat([o["logits0"] for o in outs]).double()
    if not torch.allclose(got_logits, logits0, atol=tol, rtol=tol):
        failures.append(f"{label}: initial logits differ by {(got_logits - logits0).abs().max():.2e}")
    got_losses = outs[0]["losses"].double()
    if not torch.allclose(got_losses, torch.tensor(losses, dtype=torch.float64), atol=tol):
        failures.append(f"{label}: losses {got_losses.tolist()} != {losses}")
    params = outs[0]["params"]
    for name, table in zip(table_names, ref.tables):
        key = next(k for k in params if k.endswith(f".{name}.weight"))
        got = assemble([o["params"][key] for o in outs], table.shape)
        err = (got - table.detach()).abs().max()
        if not err <= tol:
            failures.append(f"{label}: table {name} differs by {err:.2e} after {steps} steps")
    for k, p in zip(dense_names, ref.dense_params()):
        err = (params[k][0][2].double() - p.detach()).abs().max()
        if not err <= tol:
            failures.append(f"{label}: {k} differs by {err:.2e} after {steps} steps")
    return failures


def linear_layers(mlp):
    """(weight, bias) of each Linear of one of the model's MLPs, to start a reference from."""
    return [(m.weight.detach(), m.bias.detach()) for m in mlp.layers if hasattr(m, "weight")]


def dense_param_names(train_module):
    """State-dict names of the bottom and top MLP parameters, in ReferenceDLRM's order."""
    return [f"model.{arch}.{n}" for arch in ("dense_arch", "over_arch")
            for n, _ in getattr(train_module.model, arch).named_parameters()]


def train_reference(ref, cfg, source, steps):
    """Run the reference over the first `steps` single-rank batches of `source` with the
    config's optimizers. Returns (logits of batch 0 before training, per-step losses)."""
    keys = source.feature_names
    batches = list(source.batches("train", 0))
    with torch.no_grad():
        logits0 = ref.forward(batches[0].dense_features, unpack_kjt(batches[0].sparse_features, keys))
    losses = []
    for b in batches[:steps]:
        n = b.num_real  # padding sits at the end of a single-rank batch
        logits = ref.forward(b.dense_features, unpack_kjt(b.sparse_features, keys))[:n]
        loss = bce_mean(logits, b.labels[:n].double())
        losses.append(loss.item())
        if cfg.optimizer.sparse == "sgd":
            ref.sgd_step(loss, cfg.optimizer.lr)
        else:
            ref.rowwise_adagrad_tables_adagrad_dense_step(loss, cfg.optimizer.lr, cfg.optimizer.eps)
    return logits0, losses
