"""Kokoro-82M as a torch network: text tokens + a 256-d style -> 24 kHz speech.

The architecture is StyleTTS 2's inference path with an iSTFTNet vocoder, as Kokoro ships it:
an ALBERT phoneme encoder, a prosody predictor (durations, F0 and energy), a text encoder and
a style-conditioned decoder. It is defined here rather than imported from ``kokoro`` so the
daemon needs neither ``transformers`` (hundreds of MB for one ALBERT layer) nor a hub client, and
so the forward pass can follow what the shipped ONNX graph computes (see NOTES: the exported
generator has no random phase or noise, takes the source phase with atan2 and scales its iSTFT
by 1.5). Parameter names follow Kokoro's published state dict, so its checkpoints load as well.

Everything runs in float32 on any torch device; the forward is differentiable from the style to
the waveform except through the rounding of durations.

One network, one module (about 540 lines): its layers read top to bottom in the order the
model runs them, next to the parameter names they load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 24_000


@dataclass(frozen=True)
class KokoroConfig:
    """Kokoro-82M v1.0's dimensions (its published config.json, written out)."""

    n_token: int = 178
    hidden: int = 512
    style: int = 128  # each half of the 256-d style vector
    n_layer: int = 3
    max_dur: int = 50
    text_kernel: int = 5
    bert_hidden: int = 768
    bert_embedding: int = 128
    bert_heads: int = 12
    bert_intermediate: int = 2048
    bert_positions: int = 512
    bert_layers: int = 12  # one ALBERT layer applied this many times
    upsample_rates: tuple[int, ...] = (10, 6)
    upsample_kernels: tuple[int, ...] = (20, 12)
    upsample_initial: int = 512
    resblock_kernels: tuple[int, ...] = (3, 7, 11)
    resblock_dilations: tuple[tuple[int, ...], ...] = field(default=((1, 3, 5), (1, 3, 5), (1, 3, 5)))
    n_fft: int = 20
    hop: int = 5
    harmonics: int = 8
    voiced_threshold: float = 10.0
    istft_gain: float = 1.5  # the shipped graph's iSTFT is 1.5x torch.istft's (see module doc)


# ----------------------------------------------------------------------------- ALBERT


class _AlbertEmbeddings(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.n_token, c.bert_embedding)
        self.position_embeddings = nn.Embedding(c.bert_positions, c.bert_embedding)
        self.token_type_embeddings = nn.Embedding(2, c.bert_embedding)
        self.LayerNorm = nn.LayerNorm(c.bert_embedding, eps=1e-12)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.word_embeddings(tokens) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _AlbertAttention(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.heads = c.bert_heads
        self.query = nn.Linear(c.bert_hidden, c.bert_hidden)
        self.key = nn.Linear(c.bert_hidden, c.bert_hidden)
        self.value = nn.Linear(c.bert_hidden, c.bert_hidden)
        self.dense = nn.Linear(c.bert_hidden, c.bert_hidden)
        self.LayerNorm = nn.LayerNorm(c.bert_hidden, eps=1e-12)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                                 attn_mask=bias)
        return self.LayerNorm(x + self.dense(context.transpose(1, 2).reshape(b, t, d)))


class _AlbertLayer(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.attention = _AlbertAttention(c)
        self.ffn = nn.Linear(c.bert_hidden, c.bert_intermediate)
        self.ffn_output = nn.Linear(c.bert_intermediate, c.bert_hidden)
        self.full_layer_layer_norm = nn.LayerNorm(c.bert_hidden, eps=1e-12)

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x = self.attention(x, bias)
        return self.full_layer_layer_norm(x + self.ffn_output(F.gelu(self.ffn(x), approximate="tanh")))


class _AlbertGroup(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.albert_layers = nn.ModuleList([_AlbertLayer(c)])


class _AlbertEncoder(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.repeats = c.bert_layers
        self.embedding_hidden_mapping_in = nn.Linear(c.bert_embedding, c.bert_hidden)
        self.albert_layer_groups = nn.ModuleList([_AlbertGroup(c)])

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        x = self.embedding_hidden_mapping_in(x)
        layer = self.albert_layer_groups[0].albert_layers[0]
        for _ in range(self.repeats):
            x = layer(x, bias)
        return x


class Albert(nn.Module):
    """ALBERT with one shared layer; ``mask`` (batch, tokens) is True where a token is real."""

    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.embeddings = _AlbertEmbeddings(c)
        self.encoder = _AlbertEncoder(c)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        bias = None
        if mask is not None and not bool(mask.all()):
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            bias = bias.masked_fill(~mask, torch.finfo(torch.float32).min)[:, None, None, :]
        return self.encoder(self.embeddings(tokens), bias)


# ----------------------------------------------------------------------------- building blocks


def _instance_norm(x: Tensor, mask: Tensor | None) -> Tensor:
    """Instance norm over time; with ``mask`` (batch, 1, time; 1.0 where real) padding is left out
    of the statistics, so a padded item is normalised as it would be alone."""
    if mask is None:
        return F.instance_norm(x, eps=1e-5)
    n = mask.sum(dim=2, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dim=2, keepdim=True) / n
    var = ((x - mean).square() * mask).sum(dim=2, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + 1e-5)


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padding: every conv then sees what it would see at the end of an unpadded item."""
    return x if mask is None else x * mask


class AdaIN1d(nn.Module):
    """Instance norm (no affine: the shipped weights have none) scaled and shifted by the style."""

    def __init__(self, style: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(style, channels * 2)

    def forward(self, x: Tensor, s: Tensor, mask: Tensor | None = None) -> Tensor:
        gamma, beta = self.fc(s)[:, :, None].chunk(2, dim=1)
        return (1 + gamma) * _instance_norm(x, mask) + beta


class AdaLayerNorm(nn.Module):
    """Layer norm over channels, scaled and shifted by the style; x is (batch, time, channels)."""

    def __init__(self, style: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.fc = nn.Linear(style, channels * 2)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        gamma, beta = self.fc(s)[:, None, :].chunk(2, dim=-1)
        return (1 + gamma) * F.layer_norm(x, (self.channels,), eps=1e-5) + beta


class ChannelNorm(nn.Module):
    """Layer norm over the channels of a (batch, channels, time) tensor."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.transpose(1, 2), (x.shape[1],), self.gamma, self.beta, 1e-5).transpose(1, 2)


class AdainResBlk1d(nn.Module):
    """Residual block of the predictor and decoder; ``upsample`` doubles the frame rate."""

    def __init__(self, dim_in: int, dim_out: int, style: int, upsample: bool = False) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv1 = nn.Conv1d(dim_in, dim_out, 3, 1, 1)
        self.conv2 = nn.Conv1d(dim_out, dim_out, 3, 1, 1)
        self.norm1 = AdaIN1d(style, dim_in)
        self.norm2 = AdaIN1d(style, dim_out)
        self.conv1x1 = nn.Conv1d(dim_in, dim_out, 1, 1, 0, bias=False) if dim_in != dim_out else None
        self.pool = (nn.ConvTranspose1d(dim_in, dim_in, 3, 2, groups=dim_in, padding=1, output_padding=1)
                     if upsample else None)

    def forward(self, x: Tensor, s: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` is at the input's frame rate; the output (twice as long when upsampling) is
        masked at its own."""
        out_mask = mask.repeat_interleave(2, dim=2) if mask is not None and self.upsample else mask
        y = _masked(F.leaky_relu(self.norm1(x, s, mask), 0.2), mask)
        if self.pool is not None:
            y = _masked(self.pool(y), out_mask)  # its bias lands on the padding too
        y = _masked(F.leaky_relu(self.norm2(self.conv1(y), s, out_mask), 0.2), out_mask)
        y = self.conv2(y)
        shortcut = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.upsample else x
        if self.conv1x1 is not None:
            shortcut = self.conv1x1(shortcut)
        return _masked((y + shortcut) * (1 / math.sqrt(2)), out_mask)


class AdaINResBlock1(nn.Module):
    """The vocoder's residual block: Snake activations and dilated convs, style-normalised."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...], style: int) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, 1, padding=(kernel - 1) // 2) for _ in dilations)
        self.adain1 = nn.ModuleList(AdaIN1d(style, channels) for _ in dilations)
        self.adain2 = nn.ModuleList(AdaIN1d(style, channels) for _ in dilations)
        self.alpha1 = nn.ParameterList(nn.Parameter(torch.ones(1, channels, 1)) for _ in dilations)
        self.alpha2 = nn.ParameterList(nn.Parameter(torch.ones(1, channels, 1)) for _ in dilations)

    @staticmethod
    def _snake(x: Tensor, alpha: Tensor) -> Tensor:
        return x + (1 / alpha) * torch.sin(alpha * x) ** 2

    def forward(self, x: Tensor, s: Tensor, mask: Tensor | None = None) -> Tensor:
        for c1, c2, n1, n2, a1, a2 in zip(self.convs1, self.convs2, self.adain1, self.adain2, self.alpha1,
                                          self.alpha2):
            y = c1(_masked(self._snake(n1(x, s, mask), a1), mask))
            x = x + c2(_masked(self._snake(n2(y, s, mask), a2), mask))
        return _masked(x, mask)


def _length_mask(lengths: Tensor, size: int) -> Tensor:
    """(batch, 1, size) float mask, 1.0 in each item's first ``lengths[b]`` steps."""
    return (torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]).to(torch.float32)[:, None, :]


def _bilstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor | None) -> Tensor:
    """Run a batch-first bidirectional LSTM over padded sequences (padding stays out of the state)."""
    if lengths is None or bool((lengths == x.shape[1]).all()):
        return lstm(x)[0]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out = nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]
    return out


# ----------------------------------------------------------------------------- encoders and predictor


class TextEncoder(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.n_token, c.hidden)
        pad = (c.text_kernel - 1) // 2
        self.cnn = nn.ModuleList(
            nn.ModuleDict({"0": nn.Conv1d(c.hidden, c.hidden, c.text_kernel, padding=pad), "1": ChannelNorm(c.hidden)})
            for _ in range(c.n_layer))
        self.lstm = nn.LSTM(c.hidden, c.hidden // 2, 1, batch_first=True, bidirectional=True)

    def forward(self, tokens: Tensor, mask: Tensor, lengths: Tensor | None) -> Tensor:
        keep = mask[:, None, :].to(torch.float32)
        x = self.embedding(tokens).transpose(1, 2) * keep
        for block in self.cnn:
            x = F.leaky_relu(block["1"](block["0"](x)), 0.2) * keep
        x = _bilstm(self.lstm, x.transpose(1, 2), lengths).transpose(1, 2)
        return x * keep  # (batch, hidden, tokens)


class DurationEncoder(nn.Module):
    """LSTMs interleaved with style layer norms; the style is appended to every step's features."""

    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.lstms = nn.ModuleList()
        for _ in range(c.n_layer):
            self.lstms.append(nn.LSTM(c.hidden + c.style, c.hidden // 2, 1, batch_first=True, bidirectional=True))
            self.lstms.append(AdaLayerNorm(c.style, c.hidden))

    def forward(self, x: Tensor, s: Tensor, mask: Tensor, lengths: Tensor | None) -> Tensor:
        keep = mask[:, :, None].to(torch.float32)
        styles = s[:, None, :].expand(-1, x.shape[1], -1)
        x = torch.cat([x, styles], dim=-1) * keep  # (batch, tokens, hidden + style)
        for block in self.lstms:
            if isinstance(block, AdaLayerNorm):
                x = torch.cat([block(x, s), styles], dim=-1) * keep
            else:
                x = _bilstm(block, x, lengths)
        return x


class ProsodyPredictor(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        h, st = c.hidden, c.style
        self.text_encoder = DurationEncoder(c)
        self.lstm = nn.LSTM(h + st, h // 2, 1, batch_first=True, bidirectional=True)
        self.duration_proj = nn.ModuleDict({"linear_layer": nn.Linear(h, c.max_dur)})
        self.shared = nn.LSTM(h + st, h // 2, 1, batch_first=True, bidirectional=True)
        self.F0 = nn.ModuleList([AdainResBlk1d(h, h, st), AdainResBlk1d(h, h // 2, st, upsample=True),
                                 AdainResBlk1d(h // 2, h // 2, st)])
        self.N = nn.ModuleList([AdainResBlk1d(h, h, st), AdainResBlk1d(h, h // 2, st, upsample=True),
                                AdainResBlk1d(h // 2, h // 2, st)])
        self.F0_proj = nn.Conv1d(h // 2, 1, 1, 1, 0)
        self.N_proj = nn.Conv1d(h // 2, 1, 1, 1, 0)

    def durations(self, d: Tensor, lengths: Tensor | None) -> Tensor:
        """Per-token duration logits summed to frames (before speed and rounding)."""
        x = _bilstm(self.lstm, d, lengths)
        return torch.sigmoid(self.duration_proj["linear_layer"](x)).sum(dim=-1)

    def f0_energy(self, en: Tensor, s: Tensor, frames: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """F0 and energy at twice the frame rate; ``frames`` (batch,): real frames of each item."""
        mask = None if frames is None else _length_mask(frames, en.shape[2])
        x = _masked(_bilstm(self.shared, en.transpose(1, 2), frames).transpose(1, 2), mask)
        f0, n, m = x, x, mask
        for f0_block, n_block in zip(self.F0, self.N):
            f0, n = f0_block(f0, s, m), n_block(n, s, m)
            if m is not None and f0_block.upsample:
                m = m.repeat_interleave(2, dim=2)
        return _masked(self.F0_proj(f0), m)[:, 0], _masked(self.N_proj(n), m)[:, 0]


# ----------------------------------------------------------------------------- vocoder


class _SourceModule(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.l_linear = nn.Linear(c.harmonics + 1, 1)


class Generator(nn.Module):
    """iSTFTNet: upsampling convs fed by a harmonic source, ending in a 20-point iSTFT."""

    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        self.c = c
        self.scale = math.prod(c.upsample_rates) * c.hop  # samples per F0 frame
        self.m_source = _SourceModule(c)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        self.noise_convs = nn.ModuleList()
        self.noise_res = nn.ModuleList()
        ch = c.upsample_initial
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernels)):
            ch = c.upsample_initial // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(ch * 2, ch, k, u, padding=(k - u) // 2))
            for kernel, dilations in zip(c.resblock_kernels, c.resblock_dilations):
                self.resblocks.append(AdaINResBlock1(ch, kernel, dilations, c.style))
            if i + 1 < len(c.upsample_rates):
                stride = math.prod(c.upsample_rates[i + 1:])
                self.noise_convs.append(nn.Conv1d(c.n_fft + 2, ch, stride * 2, stride, padding=(stride + 1) // 2))
                self.noise_res.append(AdaINResBlock1(ch, 7, (1, 3, 5), c.style))
            else:
                self.noise_convs.append(nn.Conv1d(c.n_fft + 2, ch, 1))
                self.noise_res.append(AdaINResBlock1(ch, 11, (1, 3, 5), c.style))
        self.conv_post = nn.Conv1d(ch, c.n_fft + 2, 7, 1, padding=3)
        self.register_buffer("window", torch.hann_window(c.n_fft, periodic=True), persistent=False)
        self.register_buffer("harmonic_numbers", torch.arange(1, c.harmonics + 2, dtype=torch.float32),
                             persistent=False)

    def source(self, f0: Tensor) -> Tensor:
        """F0 per frame (batch, frames) -> the merged harmonic excitation (batch, samples).

        Deterministic, as exported: no random initial phase and no additive noise. The phase is
        accumulated at the frame rate and interpolated up, which keeps it smooth and cheap.
        """
        c = self.c
        f0 = f0.repeat_interleave(self.scale, dim=1)[:, :, None]  # nearest-neighbour upsampling
        rad = (f0 * self.harmonic_numbers / SAMPLE_RATE) % 1  # (batch, samples, harmonics)
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / self.scale, mode="linear")
        phase = torch.cumsum(rad, dim=2) * (2 * math.pi)
        phase = F.interpolate(phase * self.scale, scale_factor=float(self.scale), mode="linear").transpose(1, 2)
        voiced = (f0 > c.voiced_threshold).to(phase.dtype)
        sines = torch.sin(phase) * 0.1 * voiced
        return torch.tanh(self.m_source.l_linear(sines))[:, :, 0]

    def _harmonics(self, f0: Tensor) -> Tensor:
        """The source's STFT, magnitudes then phases: (batch, n_fft + 2, samples / hop + 1)."""
        c = self.c
        spec = torch.stft(self.source(f0), c.n_fft, c.hop, c.n_fft, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        # atan2, not angle(): the same as the exported graph's quadrant-fixed atan, and its
        # gradient is guarded where both parts are exactly zero
        re, im = spec.real, spec.imag
        zero = (re == 0) & (im == 0)
        phase = torch.atan2(im, torch.where(zero, torch.ones_like(re), re))
        return torch.cat([spec.abs(), phase], dim=1)

    def forward(self, x: Tensor, s: Tensor, f0: Tensor, frames: Tensor | None = None) -> list[Tensor]:
        """Audio per item; ``frames`` (batch,): each item's real F0 frames (``f0`` is padded to the
        longest). The source and both STFTs run per item, on its own length, as they would alone."""
        c = self.c
        lengths = [f0.shape[1]] * f0.shape[0] if frames is None else [int(n) for n in frames]
        har = torch.zeros(f0.shape[0], c.n_fft + 2, f0.shape[1] * self.scale // c.hop + 1, device=f0.device)
        for b, n in enumerate(lengths):
            har[b, :, : n * self.scale // c.hop + 1] = self._harmonics(f0[b:b + 1, :n])[0]
        # each upsampling's output is its factor times as long (the last one padded by one sample)
        masks: list[Tensor | None] = [None] * len(self.ups)
        if frames is not None:
            factor = 1
            for i, rate in enumerate(c.upsample_rates):
                factor *= rate
                extra = 1 if i == len(self.ups) - 1 else 0
                masks[i] = _length_mask(frames * factor + extra, x.shape[2] * factor + extra)
        kernels = len(c.resblock_kernels)
        for i, up in enumerate(self.ups):
            mask = masks[i]
            x = F.leaky_relu(x, 0.1)
            source = self.noise_res[i](self.noise_convs[i](har), s, mask)
            x = up(x)
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = _masked(x + source, mask)
            x = sum(self.resblocks[i * kernels + j](x, s, mask) for j in range(kernels)) / kernels
        x = self.conv_post(F.leaky_relu(x, 0.01))
        half = c.n_fft // 2 + 1
        out = []
        for b, n in enumerate(lengths):
            spec = torch.polar(torch.exp(x[b:b + 1, :half, : n * self.scale // c.hop + 1]),
                               torch.sin(x[b:b + 1, half:, : n * self.scale // c.hop + 1]))
            out.append(torch.istft(spec, c.n_fft, c.hop, c.n_fft, window=self.window, center=True)[0] * c.istft_gain)
        return out


class Decoder(nn.Module):
    def __init__(self, c: KokoroConfig) -> None:
        super().__init__()
        h, st = c.hidden, c.style
        self.encode = AdainResBlk1d(h + 2, 1024, st)
        self.decode = nn.ModuleList([AdainResBlk1d(1024 + 2 + 64, 1024, st) for _ in range(3)]
                                    + [AdainResBlk1d(1024 + 2 + 64, 512, st, upsample=True)])
        self.F0_conv = nn.Conv1d(1, 1, 3, 2, 1)
        self.N_conv = nn.Conv1d(1, 1, 3, 2, 1)
        self.asr_res = nn.ModuleList([nn.Conv1d(h, 64, 1)])
        self.generator = Generator(c)

    def forward(self, asr: Tensor, f0: Tensor, n: Tensor, s: Tensor, frames: Tensor | None = None) -> list[Tensor]:
        """``asr`` (batch, hidden, frames), ``f0``/``n`` at twice the frame rate; ``frames``:
        each item's real frames when the batch is padded. Audio per item."""
        mask = None if frames is None else _length_mask(frames, asr.shape[2])
        f0_down = _masked(self.F0_conv(f0[:, None]), mask)
        n_down = _masked(self.N_conv(n[:, None]), mask)
        x = self.encode(torch.cat([asr, f0_down, n_down], dim=1), s, mask)
        residual = _masked(self.asr_res[0](asr), mask)
        for block in self.decode:  # every block, the upsampling last one included, sees the residuals
            x = block(torch.cat([x, residual, f0_down, n_down], dim=1), s, mask)
        return self.generator(x, s, f0, None if frames is None else frames * 2)


# ----------------------------------------------------------------------------- the whole model


@dataclass
class Output:
    audio: Tensor  # (samples,) float32
    durations: Tensor  # frames per token, (tokens,) int64


class KokoroNet(nn.Module):
    def __init__(self, config: KokoroConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or KokoroConfig()
        self.bert = Albert(c)
        self.bert_encoder = nn.Linear(c.bert_hidden, c.hidden)
        self.predictor = ProsodyPredictor(c)
        self.text_encoder = TextEncoder(c)
        self.decoder = Decoder(c)

    def forward(self, tokens: Tensor, style: Tensor, speed: float = 1.0, pitch: float = 1.0) -> Output:
        """One utterance: ``tokens`` (1, n) with the pad token at both ends, ``style`` (1, 256)."""
        (out,) = self.batch([tokens[0]], style, torch.tensor([speed]), torch.tensor([pitch]))
        return out

    def batch(self, tokens: list[Tensor], style: Tensor, speed: Tensor, pitch: Tensor,
              durations: list[Tensor] | None = None) -> list[Output]:
        """Several utterances at once, each as it would come out alone.

        ``tokens``: one (n_b,) tensor per item, pad token at both ends; ``style`` (batch, 256);
        ``speed`` and ``pitch`` (batch,). Items are padded to the longest; attention, LSTMs and
        every instance norm leave the padding out, convolutions see zeros past each item's end,
        and the source and the STFTs run per item. ``durations`` (frames per token, one tensor per
        item) replaces the predicted ones, holding the timing fixed.
        """
        c = self.config
        device = style.device
        lengths = torch.tensor([len(t) for t in tokens], device=device)
        ids = nn.utils.rnn.pad_sequence([t.to(device) for t in tokens], batch_first=True)
        mask = torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]
        one = bool((lengths == ids.shape[1]).all())
        token_lengths = None if one else lengths
        s_prosody, s_timbre = style[:, c.style:], style[:, :c.style]
        d_en = self.bert_encoder(self.bert(ids, mask))
        d = self.predictor.text_encoder(d_en, s_prosody, mask, token_lengths)
        if durations is None:
            predicted = self.predictor.durations(d, token_lengths) / speed.to(device)[:, None]
            per_token = torch.round(predicted).clamp(min=1).long() * mask
        else:
            per_token = nn.utils.rnn.pad_sequence([t.to(device).long() for t in durations], batch_first=True)
        frames = per_token.sum(dim=1)
        n_frames = int(frames.max())
        # alignment (batch, tokens, frames): frame f of item b belongs to the token whose span holds it
        ends = per_token.cumsum(dim=1)
        steps = torch.arange(n_frames, device=device)
        owner = (steps[None, None, :] >= ends[:, :, None]).sum(dim=1)  # (batch, frames)
        alignment = F.one_hot(owner.clamp(max=ids.shape[1] - 1), ids.shape[1]).transpose(1, 2).to(d.dtype)
        alignment = alignment * (steps[None, :] < frames[:, None]).to(d.dtype)[:, None, :]
        en = d.transpose(1, 2) @ alignment
        frame_lengths = None if bool((frames == n_frames).all()) else frames  # masks only where padded
        f0, n = self.predictor.f0_energy(en, s_prosody, frame_lengths)
        f0 = f0 * pitch.to(device)[:, None]
        asr = self.text_encoder(ids, mask, token_lengths) @ alignment
        audio = self.decoder(asr, f0, n, s_timbre, frame_lengths)
        return [Output(a, per_token[b, : int(lengths[b])]) for b, a in enumerate(audio)]


__all__ = ["KokoroConfig", "KokoroNet", "Output", "SAMPLE_RATE"]
