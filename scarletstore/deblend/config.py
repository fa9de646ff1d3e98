"""Deblender configuration. Defaults follow the Rubin scarlet task where sensible."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..errors import InputError
from ..ingest.masks import DEFAULT_BAD_PLANES


@dataclass
class DeblendConfig:
    """Settings of a deblend run.

    Attributes
    ----------
    max_iter : int
        Maximum optimiser iterations per blend.
    relative_error : float
        Convergence when the relative change of the log-likelihood is below this.
    min_iter : int
        Iterations always run before convergence is tested.
    resize_every : int
        Component boxes are grown / shrunk every this many iterations (0: never).
    model_psf_sigma : float
        Sigma (pixels) of the Gaussian model-frame PSF.
    min_snr : float
        Sources whose start has an S/N below this start as the PSF (the Rubin
        task's ``min_snr``, with its meaning), unless ``extended_min_snr``
        lets an extended one start from the image.
    extended_min_snr : float
        A source whose start has an S/N from this up to ``min_snr`` starts
        from the image, not as the PSF, if its start is extended: flux / peak
        at least ``scarlet.EXTENDED_START_RATIO`` (2) times the detection
        PSF's. A faint resolved galaxy started as the PSF never grows to its
        size and loses its light to brighter neighbours; compact faint
        sources (and noise peaks) keep the PSF start, which keeps them from
        absorbing undetected neighbours. At or above ``min_snr``: off.
    bulge_snr : float
        Sources started from the image with an S/N above this get two
        components (bulge + disk); between ``min_snr`` and this, one. The
        Rubin task ties it to ``2 * min_snr``; it is its own setting so that
        the PSF start can move without bulges moving with it (docs/design.md,
        "Why faint galaxies are lost"). Below ``min_snr`` it has no effect.
    background_thresh, initial_background_thresh : float
        Sparsity / box thresholds in units of the background noise.
    optimizer : str
        ``"adaprox"`` (proximal AMSGrad) or ``"fista"``.
    use_weights : bool
        Weight pixels by inverse variance (else uniform weights).
    bad_mask_planes : list of str
        Mask planes whose pixels get zero weight.
    set_spectra : bool
        Re-solve spectra by least squares after initialisation.
    max_spectrum_cutoff : float
        n_peaks x bbox area above which the (always coupled) least-squares
        spectra are solved by block Gauss-Seidel over sources instead of the
        joint active-set solve.
    process_singles : bool
        Fit single-peak parents; otherwise store them as isolated sources.
    isolated_model : bool
        With ``process_singles`` off, still give an isolated source (scarlet
        runs) a one-source fit as its model, so its model flux is a fit
        rather than a sum over its detection footprint; the parent stays
        ``isolated`` and its redistributed footprint is the image either
        way. Off: the model is the image inside the footprint.
    max_number_of_peaks, max_footprint_area, max_area_times_peaks : float
        Size limits; with ``split_large_parents`` off, a parent over one is
        skipped with its reason (with it on, ``memory_budget`` decides).
    max_footprint_size : int
        Maximum bbox side (0: off).
    min_footprint_axis_ratio : float
        Minimum bbox axis ratio (0: off).
    mask_limits : dict
        Mask plane -> maximum fraction of the footprint it may cover.
    catch_failures : bool
        A blend that raises is recorded as failed instead of stopping the run.
    symmetric : bool
        Add the symmetry constraint to morphologies: 180-degree symmetry
        about each exact peak position (symmetric about the peak rounded to
        half a pixel, rendered shifted by the rest; see docs/design.md).
    symmetry_region : str
        Where symmetry applies. ``"contested"`` (default): only to mirror
        pairs where another source's model light exceeds ``contest_ratio``
        times this source's, i.e. where flux is shared and symmetry decides
        who owns it; a source's own core and wings away from neighbours stay
        free, so real, irregular galaxies (and cores a little off their
        peak) are not forced; faint sources (start S/N below 50, the default
        ``min_snr``, whether started as the PSF or, extended, from the
        image) are kept symmetric over their whole box,
        where symmetry averages noise rather than forcing structure. ``"all"``: the whole box for every source, the strongest
        separation when positions are exact, but it breaks real galaxies.
    contest_ratio : float
        Neighbour light / own light above which a pixel is contested (> 0).
    symmetry_strength : float
        In (0, 1]: each step moves a pixel and its mirror this fraction of
        the way to their mean (1 = projection). Softer symmetry tolerates
        peak positions that are a little off. Used only when ``symmetric``.
    monotonic : bool
        Apply the monotonicity constraint.
    split_large_parents : bool
        A parent whose estimated fit memory exceeds ``memory_budget`` is
        deblended in overlapping pieces (flag ``split``) instead of being
        skipped; off, the size limits above skip parents as before.
    memory_budget : float
        Bytes one fit may use on a worker (estimate: ``deblend.split.fit_memory``).
    split_margin : float
        Pixels each piece extends past its own peaks' cell (the overlap).
    residual_sources : bool
        After a blend's fit, add a source (flag ``found_peak``) where the
        PSF-matched residual has a local maximum above ``residual_thresh``
        sigma and ``residual_frac`` times the model's matched significance
        there, and refit (a few rounds; see ``deblend.residual``). Not in
        fits continued from a stored run, isolated parents or split pieces.
    residual_thresh : float
        Significance (sigma) a residual maximum must exceed.
    residual_frac : float
        ... and this fraction of the model's significance at that pixel (in
        quadrature): a bright core's model residual grows with its flux.
    residual_symmetric : bool
        Search the residual of each source's point-symmetric part instead
        (light a neighbour's free pixels absorbed shows there; the plain
        residual of a lone galaxy hides even an S/N 100 star 2 FWHM away),
        and restart the neighbours from their symmetric parts. Finds stars
        on galaxy slopes, but also model asymmetries of crowded blends
        (docs/design.md, "Sources found in the residual").
    shared_gradient : bool
        Give the one-component sources of a field (``deblend_exposure``) a
        colour gradient shared by all of them: band b's template of such a
        component is m + alpha_b D, D = (r^2 / <r^2> - 1) m (zero sum), one
        alpha_b per band fitted by weighted least squares over the field's
        pixels (shrunk where its S/N is below 2), then their spectra
        re-solved. Only the spectra (so the fluxes and colours) change; the
        stored model stays spectrum x m, whose log-likelihood drops a
        little (docs/design.md, "Colours of faint sources"). Off by default.
    cmodel_snr : float
        After the fit, one-component sources whose box overlaps no other
        source's and whose start S/N is below this get a parametric template
        instead of their free morphology: an exponential plus a de
        Vaucouleurs profile sharing centre, half-light radius and ellipse
        (fitted, per-band amplitudes solved inside), on a box that holds the
        profile's wings and still overlaps no other source's
        (:mod:`scarletstore.deblend.cmodel`; 0: off; docs/design.md, "A
        two-profile parametric template").
    cmodel_chi2 : float
        ... kept only where its chi^2 over the fit's region exceeds the free
        morphology's by at most this (negative: always kept).
    """

    max_iter: int = 300
    relative_error: float = 1e-3
    min_iter: int = 5
    resize_every: int = 3
    model_psf_sigma: float = 0.8
    min_snr: float = 50.0
    extended_min_snr: float = 25.0
    bulge_snr: float = 100.0
    background_thresh: float = 1.0
    initial_background_thresh: float = 1.0
    optimizer: str = "adaprox"
    use_weights: bool = True
    bad_mask_planes: list = field(default_factory=lambda: list(DEFAULT_BAD_PLANES))
    set_spectra: bool = True
    max_spectrum_cutoff: float = 1e6
    process_singles: bool = False
    isolated_model: bool = True
    max_number_of_peaks: int = 600
    max_footprint_area: float = 2e6
    max_area_times_peaks: float = 1e9
    max_footprint_size: int = 0
    min_footprint_axis_ratio: float = 0.0
    mask_limits: dict = field(default_factory=dict)
    catch_failures: bool = True
    symmetric: bool = True
    symmetry_region: str = "contested"
    contest_ratio: float = 0.5
    symmetry_strength: float = 1.0
    monotonic: bool = True
    split_large_parents: bool = True
    memory_budget: float = 2e9
    split_margin: float = 20.0
    residual_sources: bool = False
    residual_thresh: float = 7.0
    residual_frac: float = 0.1
    residual_symmetric: bool = False
    shared_gradient: bool = False
    cmodel_snr: float = 0.0
    cmodel_chi2: float = -1.0

    def __post_init__(self):
        self._check_types()
        if self.optimizer not in ("adaprox", "fista"):
            raise InputError(f"optimizer must be 'adaprox' or 'fista', not {self.optimizer!r}")
        if self.max_iter < 1 or self.min_iter < 0:
            raise InputError("max_iter must be >= 1 and min_iter >= 0")
        if self.relative_error <= 0:
            raise InputError("relative_error must be positive")
        if self.symmetry_region not in ("contested", "all"):
            raise InputError(f"symmetry_region must be 'contested' or 'all', not {self.symmetry_region!r}")
        if not self.contest_ratio > 0:
            raise InputError(f"contest_ratio must be positive, not {self.contest_ratio!r}")
        if not 0 < self.symmetry_strength <= 1:
            raise InputError(f"symmetry_strength must be in (0, 1], not {self.symmetry_strength!r}")
        if not self.model_psf_sigma > 0:
            raise InputError(f"model_psf_sigma must be positive, not {self.model_psf_sigma!r}")
        if self.max_number_of_peaks < 1:
            raise InputError(f"max_number_of_peaks must be at least 1, not {self.max_number_of_peaks!r}")
        for name in ("resize_every", "min_snr", "extended_min_snr", "bulge_snr", "background_thresh",
                     "initial_background_thresh", "max_spectrum_cutoff", "max_footprint_area",
                     "max_area_times_peaks", "max_footprint_size", "min_footprint_axis_ratio", "split_margin",
                     "residual_thresh", "residual_frac", "cmodel_snr"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise InputError(f"{name} must be >= 0, not {getattr(self, name)!r}")
        if not self.memory_budget > 0:
            raise InputError(f"memory_budget must be positive (bytes), not {self.memory_budget!r}")
        for plane, limit in self.mask_limits.items():
            if not 0 <= limit <= 1:
                raise InputError(f"mask_limits[{plane!r}] must be a fraction in [0, 1], not {limit!r}")

    def _check_types(self):
        """Refuse values of the wrong type (``--set`` parses JSON, so a typo
        arrives as a string) and make numbers the fields' own type: a float
        that is a whole number is accepted for an int field (1e3), an int for
        a float field."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = number and float(value).is_integer()
                if ok:
                    value = int(value)
            elif kind == "float":
                ok = number
                if ok:
                    value = float(value)
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "list":
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
                if ok:
                    value = list(value)
            else:  # dict: mask plane -> fraction
                ok = isinstance(value, dict) and all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in value.items())
                if ok:
                    value = {k: float(v) for k, v in value.items()}
            if not ok:
                expect = {"bool": "true or false", "int": "a whole number", "float": "a number",
                          "str": "a string", "list": "a list of names (JSON, or comma-separated)",
                          }.get(kind, 'a JSON object of plane -> fraction, e.g. {"BAD": 0.5}')
                raise InputError(f"{f.name} must be {expect}, not {value!r}")
            setattr(self, f.name, value)

    def to_json(self) -> str:
        # the fields directly: dataclasses.asdict deep-copies (250 us), and
        # every fit records its configuration
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DeblendConfig":
        values = json.loads(text)
        if "min_snr" in values:
            # a run stored before these settings existed: bulges above
            # 2 x min_snr, and every start below min_snr the PSF
            values.setdefault("bulge_snr", 2 * values["min_snr"])
            values.setdefault("extended_min_snr", values["min_snr"])
        return cls(**values)

    def with_overrides(self, items: list[str]) -> "DeblendConfig":
        """Apply ``KEY=VALUE`` strings (values parsed as JSON, else kept as strings)."""
        values = dataclasses.asdict(self)
        for item in items:
            if "=" not in item:
                raise InputError(f"--set expects KEY=VALUE, got {item!r}")
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in values:
                raise InputError(f"unknown configuration key {key!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key == "bad_mask_planes" and isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if isinstance(values[key], bool) and isinstance(value, str) \
                    and value.lower() in ("true", "false"):
                value = value.lower() == "true"  # Python's spelling, True / False
            values[key] = value
        return type(self)(**values)
