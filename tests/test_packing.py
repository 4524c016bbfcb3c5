"""Packed documents (document_ids): each document gets exactly what it gets alone, outputs and gradients."""
import pytest
import torch

import longformer
from device import on_device

PAD = 1


def small_model(backend, max_global_tokens=None):
    torch.manual_seed(0)
    config = longformer.LongformerConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        attention_window=[4, 8, 6], max_position_embeddings=80, type_vocab_size=1, pad_token_id=PAD)
    model = longformer.LongformerModel(config).eval()
    model.settings.attention_backend, model.settings.max_global_tokens = backend, max_global_tokens
    return on_device(model)


def documents(seed=3):
    """Six documents, lengths no multiple of any window, global tokens in some of them."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n, n_global in ((7, 1), (13, 0), (3, 2), (22, 0), (9, 3), (1, 1)):
        ids = torch.randint(3, 60, (n,), generator=g)
        glob = torch.zeros(n, dtype=torch.long)
        glob[torch.randperm(n, generator=g)[:n_global]] = 1
        docs.append((ids, glob))
    return docs


def pack(docs, rows, L):
    """rows: lists of document indices per row; padding at the end of each row (with its own document id)."""
    ids = torch.full((len(rows), L), PAD)
    am, gm, doc_ids = (torch.zeros(len(rows), L, dtype=torch.long) for _ in range(3))
    for r, members in enumerate(rows):
        at = 0
        for d in members:
            x, g = docs[d]
            ids[r, at:at + len(x)], gm[r, at:at + len(x)], doc_ids[r, at:at + len(x)] = x, g, d
            am[r, at:at + len(x)] = 1
            at += len(x)
        doc_ids[r, at:] = -1
    return on_device(ids, am, gm, doc_ids)


def projection(L, seed):
    return on_device(torch.randn(L, 32, generator=torch.Generator().manual_seed(seed)))


ROWS, L = [[0, 1, 2], [3, 4, 5], [5, 2]], 40


@pytest.mark.parametrize("max_global_tokens", [None, 6])
@pytest.mark.parametrize("backend", ["dense", "chunked", "sdpa", "auto"])
def test_packed_documents_equal_documents_alone(backend, max_global_tokens):
    docs = documents()
    model = small_model(backend, max_global_tokens)
    ids, am, gm, doc_ids = pack(docs, ROWS, L)
    packed = model(ids, attention_mask=am, global_attention_mask=gm, document_ids=doc_ids).last_hidden_state
    # A loss that reaches every parameter, with its own random weights for each token of each document.
    loss = 0
    for r, members in enumerate(ROWS):
        at = 0
        for d in members:
            n = len(docs[d][0])
            loss = loss + (packed[r, at:at + n] * projection(n, 10 * r + d)).sum()
            at += n
    loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    for r, d, at, x, g in placed(docs):
        alone = model(x[None], global_attention_mask=g[None]).last_hidden_state[0]
        torch.testing.assert_close(packed[r, at:at + len(x)], alone, atol=1e-5, rtol=0)
        (alone * projection(len(x), 10 * r + d)).sum().backward()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        diff, norm = (packed_grads[name] - p.grad).norm(), p.grad.norm()
        assert diff <= 1e-4 * norm + 1e-7, f"gradient of {name}: |diff| {diff:.2e} vs |grad| {norm:.2e}"
    assert set(packed_grads) == {k for k, p in model.named_parameters() if p.grad is not None}


def test_packed_documents_equal_documents_alone_without_autograd():
    """The same without autograd, where CPU's fp32 band runs through its inference kernel (strided views)."""
    docs = documents()
    model = small_model("sdpa")
    ids, am, gm, doc_ids = pack(docs, ROWS, L)
    with torch.no_grad():
        packed = model(ids, attention_mask=am, global_attention_mask=gm, document_ids=doc_ids).last_hidden_state
        for r, _, at, x, g in placed(docs):
            alone = model(x[None], global_attention_mask=g[None]).last_hidden_state[0]
            torch.testing.assert_close(packed[r, at:at + len(x)], alone, atol=1e-5, rtol=0)


def placed(docs):
    """(row, document, first position, ids, global mask) of every document of ROWS, on the device."""
    for r, members in enumerate(ROWS):
        at = 0
        for d in members:
            x, g = on_device(*docs[d])
            yield r, d, at, x, g
            at += len(x)


def test_without_document_ids_documents_see_each_other():
    """The test above can fail: the same packed rows without document_ids differ from the documents alone."""
    docs = documents()
    model = small_model("sdpa")
    ids, am, gm, doc_ids = pack(docs, ROWS, L)
    with torch.no_grad():
        packed = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        x, g = on_device(*docs[1])
        alone = model(x[None], global_attention_mask=g[None]).last_hidden_state[0]
    assert (packed[0, 7:20] - alone).abs().max() > 1e-2


def test_positions_restart_at_each_document():
    model = small_model("sdpa")
    ids = on_device(torch.tensor([[5, 6, 7, 5, 6, 5, PAD, PAD]]))
    doc_ids = on_device(torch.tensor([[4, 4, 4, 0, 0, 9, 9, 9]]))  # any ids: a change starts a document
    from longformer.attention import document_segments
    positions = model.embeddings.position_ids(ids, ids.shape, ids.device, document_segments(doc_ids))
    assert positions.tolist() == [[2, 3, 4, 2, 3, 2, PAD, PAD]]


def test_document_ids_of_the_wrong_shape_are_refused():
    model = small_model("sdpa")
    with pytest.raises(ValueError, match="document_ids has shape"):
        model(on_device(torch.tensor([[5, 6, 7]])), document_ids=on_device(torch.tensor([[0, 0]])))
