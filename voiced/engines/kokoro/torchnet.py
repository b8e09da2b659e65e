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


class AdaIN1d(nn.Module):
    """Instance norm (no affine: the shipped weights have none) scaled and shifted by the style."""

    def __init__(self, style: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(style, channels * 2)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        gamma, beta = self.fc(s)[:, :, None].chunk(2, dim=1)
        return (1 + gamma) * F.instance_norm(x, eps=1e-5) + beta


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

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        y = F.leaky_relu(self.norm1(x, s), 0.2)
        if self.pool is not None:
            y = self.pool(y)
        y = self.conv2(F.leaky_relu(self.norm2(self.conv1(y), s), 0.2))
        shortcut = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.upsample else x
        if self.conv1x1 is not None:
            shortcut = self.conv1x1(shortcut)
        return (y + shortcut) * (1 / math.sqrt(2))


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

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        for c1, c2, n1, n2, a1, a2 in zip(self.convs1, self.convs2, self.adain1, self.adain2, self.alpha1,
                                          self.alpha2):
            y = c1(self._snake(n1(x, s), a1))
            x = x + c2(self._snake(n2(y, s), a2))
        return x


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

    def f0_energy(self, en: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        x = self.shared(en.transpose(1, 2))[0].transpose(1, 2)
        f0, n = x, x
        for block in self.F0:
            f0 = block(f0, s)
        for block in self.N:
            n = block(n, s)
        return self.F0_proj(f0)[:, 0], self.N_proj(n)[:, 0]


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

    def forward(self, x: Tensor, s: Tensor, f0: Tensor) -> Tensor:
        c = self.c
        spec = torch.stft(self.source(f0), c.n_fft, c.hop, c.n_fft, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        # atan2, not angle(): the same as the exported graph's quadrant-fixed atan, and its
        # gradient is guarded where both parts are exactly zero
        re, im = spec.real, spec.imag
        zero = (re == 0) & (im == 0)
        phase = torch.atan2(im, torch.where(zero, torch.ones_like(re), re))
        har = torch.cat([spec.abs(), phase], dim=1)
        kernels = len(c.resblock_kernels)
        for i, up in enumerate(self.ups):
            x = F.leaky_relu(x, 0.1)
            source = self.noise_res[i](self.noise_convs[i](har), s)
            x = up(x)
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + source
            x = sum(self.resblocks[i * kernels + j](x, s) for j in range(kernels)) / kernels
        x = self.conv_post(F.leaky_relu(x, 0.01))
        half = c.n_fft // 2 + 1
        spec = torch.polar(torch.exp(x[:, :half]), torch.sin(x[:, half:]))
        audio = torch.istft(spec, c.n_fft, c.hop, c.n_fft, window=self.window, center=True)
        return audio * c.istft_gain


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

    def forward(self, asr: Tensor, f0: Tensor, n: Tensor, s: Tensor) -> Tensor:
        f0_down = self.F0_conv(f0[:, None])
        n_down = self.N_conv(n[:, None])
        x = self.encode(torch.cat([asr, f0_down, n_down], dim=1), s)
        residual = self.asr_res[0](asr)
        for block in self.decode:  # every block, the upsampling last one included, sees the residuals
            x = block(torch.cat([x, residual, f0_down, n_down], dim=1), s)
        return self.generator(x, s, f0)


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
        mask = torch.ones_like(tokens, dtype=torch.bool)
        s_prosody, s_timbre = style[:, self.config.style:], style[:, :self.config.style]
        d_en = self.bert_encoder(self.bert(tokens, mask))
        d = self.predictor.text_encoder(d_en, s_prosody, mask, None)
        frames = self.predictor.durations(d, None) / speed
        durations = torch.round(frames).clamp(min=1).long()[0]
        alignment = torch.repeat_interleave(torch.eye(tokens.shape[1], device=tokens.device), durations, dim=1)
        en = d.transpose(1, 2) @ alignment[None]
        f0, n = self.predictor.f0_energy(en, s_prosody)
        f0 = f0 * pitch
        asr = self.text_encoder(tokens, mask, None) @ alignment[None]
        audio = self.decoder(asr, f0, n, s_timbre)
        return Output(audio[0], durations)


__all__ = ["KokoroConfig", "KokoroNet", "Output", "SAMPLE_RATE"]
