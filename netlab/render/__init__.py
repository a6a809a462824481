"""Pure renderers: desired services + endpoints -> kube-proxy's rules, as text for the kernel tools."""
