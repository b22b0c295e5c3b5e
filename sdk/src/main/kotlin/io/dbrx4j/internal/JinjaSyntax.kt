package io.dbrx4j.internal

import com.hubspot.jinjava.Jinjava
import com.hubspot.jinjava.JinjavaConfig
import com.hubspot.jinjava.el.ExtendedSyntaxBuilder
import com.hubspot.jinjava.el.TruthyTypeConverter
import com.hubspot.jinjava.el.ext.ExtendedParser
import jinjava.de.odysseus.el.ExpressionFactoryImpl
import jinjava.de.odysseus.el.tree.TreeStore
import jinjava.de.odysseus.el.tree.impl.Builder
import jinjava.de.odysseus.el.tree.impl.Cache
import jinjava.de.odysseus.el.tree.impl.Parser
import jinjava.de.odysseus.el.tree.impl.Scanner
import jinjava.de.odysseus.el.tree.impl.ast.AstNode
import jinjava.de.odysseus.el.tree.impl.ast.AstUnary
import jinjava.javax.el.ExpressionFactory

/**
 * Jinja2's operator precedence for `not`. Jinjava (as of 2.7.4) parses `not` as a tight unary operator,
 * so `not 'system' in role` means `(not 'system') in role`; in Jinja2 `not` binds looser than every
 * comparison (`in`, `not in`, `is`, `==`, `<`, ...) and tighter than `and`/`or`: `not ('system' in role)`.
 * Templates come from checkpoints, so the parser is fixed rather than any one template.
 */
internal class Jinja2Parser(context: Builder, input: String) : ExtendedParser(context, input) {
    override fun unary(required: Boolean): AstNode? {
        if (token.symbol == Scanner.Symbol.NOT) {
            consumeToken()
            // The operand of `not` is a whole comparison chain (eq covers cmp, in, is, arithmetic, filters).
            return createAstUnary(eq(true), AstUnary.NOT)
        }
        return super.unary(required)
    }
}

internal class Jinja2SyntaxBuilder(vararg features: Feature) : ExtendedSyntaxBuilder(*features) {
    override fun createParser(expression: String): Parser = Jinja2Parser(this, expression)

    private companion object {
        private const val serialVersionUID = 1L
    }
}

/** Jinjava whose expressions are parsed with [Jinja2Parser]; otherwise configured like Jinjava's own. */
internal class Jinja2Jinjava(config: JinjavaConfig) : Jinjava(config) {
    private val factory: ExpressionFactory = ExpressionFactoryImpl(
        // The features Jinjava's default (JEE6) profile gives its own builder.
        TreeStore(Jinja2SyntaxBuilder(Builder.Feature.METHOD_INVOCATIONS, Builder.Feature.VARARGS), Cache(256)),
        TruthyTypeConverter(),
    )

    override fun getExpressionFactory(): ExpressionFactory = factory
}
