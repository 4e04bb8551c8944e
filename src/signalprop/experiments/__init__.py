"""Paper reproductions on data that ships with scikit-learn (no downloads), each in minutes on a CPU.

* :mod:`~signalprop.experiments.he2015`: Caffe's "xavier" vs He init on 22- and 30-layer plain ReLU CNNs
  (He et al. 2015, Figs. 2-3): at 30 layers xavier stalls at ln 10 while He learns.
* :mod:`~signalprop.experiments.glorot2010`: per-layer activation and back-propagated gradient histograms
  of a 5-hidden-layer tanh MLP, standard vs normalized init (Glorot & Bengio 2010, Figs. 6-7).
* :mod:`~signalprop.experiments.criticality`: the tanh order-to-chaos phase diagram with the chi1 = 1 line
  and the depth scale xi_c, and measured correlations of real deep networks against the c-map
  (Poole et al. 2016; Schoenholz et al. 2017).
* :mod:`~signalprop.experiments.xiao2018`: a deep vanilla tanh CNN (100-1,000 layers) at the critical point trains
  with delta-orthogonal kernels and not with Gaussian ones (Xiao et al. 2018).

Each has ``run(out=None, quick=False, seed=0, *, progress=False, config=None) -> Result``; ``Result`` holds
the numbers, ``checks`` (the paper's claims as booleans), ``ok``, ``summary()`` and the ``png`` / ``json``
paths written under ``out``. From the shell: ``signalprop reproduce {he2015,glorot2010,criticality,xiao2018,all}``.
"""

from __future__ import annotations

from . import criticality as criticality
from . import glorot2010 as glorot2010
from . import he2015 as he2015
from . import xiao2018 as xiao2018

EXPERIMENTS = {"he2015": he2015, "glorot2010": glorot2010, "criticality": criticality, "xiao2018": xiao2018}
"""Name -> module; each module has ``run`` and ``Result``. The CLI's choices, in the order ``all`` runs them."""

__all__ = ["EXPERIMENTS", "criticality", "glorot2010", "he2015", "xiao2018"]
