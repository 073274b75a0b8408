"""``tdproxy rollout``: a progressive rollout driven through the config file and judged on the
running proxies' own metrics (:mod:`.plan`, :mod:`.judge`, :mod:`.proxies`, :mod:`.output`,
:mod:`.runner`)."""
