from nattraverse.methods.direct import DirectMethod
from nattraverse.methods.relay import RelayMethod
from nattraverse.methods.reversal import ReversalMethod

direct = DirectMethod()
reversal = ReversalMethod()
relay = RelayMethod()
