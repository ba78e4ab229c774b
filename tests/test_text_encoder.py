"""MiniLM in NNX against transformers' BertModel (torch CPU) on the same shipped weights."""
import numpy as np
import torch
import transformers

from attrib.text_encoder import MiniLMTextEncoder, minilm_dir
from tests.tolerance import assert_network_close, total_fan_in

CAPTIONS = ['a handwritten seven', 'a thick, slanted handwritten zero written quickly', '']


def test_minilm_matches_transformers_bert():
  encoder = MiniLMTextEncoder(max_len=16)
  ids, mask = encoder.tokenize(CAPTIONS)
  assert ids.shape == (3, 16) and mask[2].sum() == 2  # [CLS] [SEP] for the empty caption
  bert = transformers.BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False).eval()
  with torch.no_grad():
    expected = bert(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long()).last_hidden_state.numpy()
  states, _ = encoder(CAPTIONS)
  valid = mask.astype(bool)  # padded positions are never read (masked out of attention and pooling)
  depth = total_fan_in(bert.parameters()) + 2 * bert.config.num_hidden_layers * ids.shape[1]
  assert_network_close(np.asarray(states)[valid], expected[valid], reduction_length=depth, what='hidden states')
  pooled = np.asarray(encoder.sentence_embedding(CAPTIONS))
  m = mask[..., None]
  reference = (expected * m).sum(1) / m.sum(1)
  reference /= np.linalg.norm(reference, axis=-1, keepdims=True)
  assert_network_close(pooled, reference, reduction_length=depth + ids.shape[1] + bert.config.hidden_size,
                       what='pooled, normalised')
  # A real pretrained encoder: related captions are closer than unrelated ones.
  e = np.asarray(encoder.sentence_embedding(['a handwritten seven', 'a handwritten 7', 'a red sports car']))
  assert e[0] @ e[1] > e[0] @ e[2] + 0.2
